"""Self-pinching gates, the ump baseline, fold and calibration, on tiny random HF models (CPU)."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCTC

from pinch_ray.core import gates, masks
from pinch_ray.config import ConfigError, GateConfig
from pinch_ray.core.models import count_parameters, load_model

ARCHS = ["tiny", "tiny-hubert", "tiny-wavlm"]
NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     feat_proj_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0)


def audio(batch=2, seconds=1.0, seed=0):
    return torch.randn(batch, int(seconds * 16_000), generator=torch.Generator().manual_seed(seed))


def gated_model(arch="tiny", threshold=0.8, **gate_settings):
    model, _ = load_model(arch, **NO_RANDOMNESS)
    found = gates.attach_gates(model, GateConfig(threshold_init=threshold, **gate_settings))
    return model, found


@pytest.mark.parametrize("arch", ARCHS)
def test_one_threshold_per_gated_matrix_and_gradients_reach_all(arch):
    model, _ = load_model(arch, **NO_RANDOMNESS)
    plain_params = sum(p.numel() for p in model.parameters())
    found = gates.attach_gates(model, GateConfig(threshold_init=0.5))
    # default: q/k/v/out + 2 feed-forward per layer (3 layers) + feature projection, and the conv
    # layers: 4 of the feature encoder (the tiny preset) + the positional conv
    assert len(found) == 3 * 6 + 1 + 4 + 1
    assert len(gates.attach_gates(load_model(arch, **NO_RANDOMNESS)[0],
                                  GateConfig(gate_feature_encoder=False, gate_pos_conv=False))) == 3 * 6 + 1
    assert sum(p.numel() for p in model.parameters()) == plain_params + len(found)
    assert all(g.threshold.numel() == 1 for g in found.values())

    model.train()
    labels = torch.randint(5, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    loss = model(audio(), labels=labels).loss + gates.soft_sparsity(model)
    loss.backward()
    for name, (module, gate) in gates.gated_modules(model).items():
        assert gate.threshold.grad is not None and gate.threshold.grad != 0, name
        # original, or original0/1 under the positional conv's weight norm
        originals = [p for n, p in module.parametrizations.weight.named_parameters() if n.startswith("original")]
        assert originals and all(w.grad is not None and w.grad.abs().sum() > 0 for w in originals), name


def test_fused_soft_mask_matches_autograd_reference():
    torch.manual_seed(0)
    upstream = torch.randn(7, 5, dtype=torch.float64)
    tau = 0.05

    def reference(w, t, tau):
        w2 = w * w
        mask = torch.sigmoid((w2 / w2.mean().detach() - t * t) / (2 * tau))
        return w * mask, mask.sum()

    results = []
    for fn in (lambda w, t, tau: masks._SoftMaskedWeight.apply(w, t, torch.tensor(tau, dtype=w.dtype)), reference):
        weight = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        threshold = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        masked, mask_sum = fn(weight, threshold, tau)
        ((masked * upstream).sum() + 0.3 * mask_sum).backward()
        results.append((masked.detach(), mask_sum.detach(), weight.grad, threshold.grad))
    for fused, ref in zip(*results):
        torch.testing.assert_close(fused, ref)


def test_regrow_passes_the_weight_gradient_straight_through_the_mask():
    """gates.regrow: a pruned weight (mask ~0) receives the loss gradient unchanged, a kept one as
    before, the threshold the same gradient either way; without it a pruned weight gets ~nothing."""
    weight = torch.tensor([[0.01, -0.02, 1.5], [-1.4, 0.03, 1.2]], dtype=torch.float64)
    upstream = torch.tensor([[0.5, -0.7, 0.2], [0.3, 0.9, -0.4]], dtype=torch.float64)
    tau = torch.tensor(0.005, dtype=torch.float64)
    grads = {}
    for regrow in (False, True):
        w = weight.clone().requires_grad_()
        t = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        masked, mask_sum = masks._SoftMaskedWeight.apply(w, t, tau, regrow)
        ((masked * upstream).sum() + 0.3 * mask_sum).backward()
        grads[regrow] = (w.grad, t.grad)
    pruned = weight.abs() < 0.1
    assert grads[False][0][pruned].abs().max() < 1e-6  # pinched off: no learning signal
    torch.testing.assert_close(grads[True][0][pruned], upstream[pruned])  # straight through
    torch.testing.assert_close(grads[True][0][~pruned], grads[False][0][~pruned])
    torch.testing.assert_close(grads[True][1], grads[False][1])
    _, found = gated_model(regrow=True)
    assert all(g.regrow for g in found.values())


def test_soft_mask_at_a_small_temperature_has_no_denormal_values():
    """Late in training most pruned weights sit far below their threshold; their mask values (and
    the products with them) must stay normal floats, which x86 computes ~100x faster, while the
    mask still equals the exact sigmoid to within sigmoid(-20) = 2.1e-9."""
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    threshold, tau = torch.tensor(1.0), torch.tensor(0.005)
    masked, mask_sum, _ = masks._soft_mask_forward(weight, threshold, tau)
    w2 = weight.double() ** 2
    exact = torch.sigmoid((w2 / w2.mean() - 1.0) / (2 * 0.005))
    assert (exact[exact > 0] < torch.finfo(torch.float32).tiny).sum() > 1000  # the case this is about
    mask = masked / weight
    tiny = torch.finfo(torch.float32).tiny
    assert not ((mask != 0) & (mask.abs() < tiny)).any()
    assert not ((masked != 0) & (masked.abs() < tiny) & (weight.abs() > 1e-6)).any()
    torch.testing.assert_close(mask.double(), exact, rtol=1e-5, atol=2.1e-9)
    assert mask_sum.item() == pytest.approx(exact.sum().item(), rel=1e-5, abs=2.1e-9 * weight.numel())
    assert mask.min() > 2e-9  # the floor: gradients g * M stay normal floats, and so do AdamW's states


def test_soft_mask_tends_to_hard_mask_as_tau_goes_to_zero():
    model, _ = gated_model(threshold=0.9)
    model.eval()
    x = audio()
    with torch.no_grad():
        with gates.gate_mode(model, "hard"):
            hard = model(x).logits
        errors = []
        for tau in (0.1, 1e-2, 1e-4, 1e-8):
            gates.set_tau(model, tau)
            with gates.gate_mode(model, "soft"):
                errors.append((model(x).logits - hard).abs().max().item())
    assert errors == sorted(errors, reverse=True)  # closer at every step down
    assert errors[-1] < 1e-5


def test_eval_mode_uses_hard_masks_and_train_mode_soft():
    model, found = gated_model(threshold=0.9)
    module, gate = next(iter(gates.gated_modules(model).values()))
    model.eval()
    assert (module.weight == 0).float().mean() > 0.3  # hard: exact zeros
    model.train()
    assert (module.weight == 0).float().mean() == 0  # soft: attenuated, not zero


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("extra", [{}, {"gate_pos_conv": False, "gate_feature_encoder": False}])
def test_fold_equals_hard_masked_model_and_reloads(arch, extra, tmp_path):
    model, found = gated_model(arch, threshold=0.9, **extra)
    convs = not extra  # gated by default
    assert any("pos_conv" in n for n in found) == convs and any("conv_layers" in n for n in found) == convs
    model.eval()
    x = audio()
    with torch.no_grad():
        hard_logits = model(x).logits
    counts_gated = count_parameters(model)
    names_before = {n for n, _ in load_model(arch, **NO_RANDOMNESS)[0].named_parameters()}

    folded = gates.fold(model)
    assert type(folded).__name__.endswith("ForCTC")
    assert not gates.gated_modules(folded)
    assert {n for n, _ in folded.named_parameters()} == names_before  # no gate parameter left
    with torch.no_grad():
        torch.testing.assert_close(folded(x).logits, hard_logits, atol=1e-5, rtol=0)
    assert count_parameters(folded).nonzero == counts_gated.nonzero
    assert count_parameters(folded).total == counts_gated.total

    folded.save_pretrained(tmp_path)
    reloaded = AutoModelForCTC.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, hard_logits, atol=1e-5, rtol=0)


def test_uniform_magnitude_pruning_prunes_exactly_the_target_in_every_matrix():
    model, _ = load_model("tiny")
    weights = {n: m.weight.detach().clone() for n, m in gates.select_modules(model, GateConfig().patterns).items()}
    gates.attach_uniform_masks(model, GateConfig(), 0.65)
    layers = gates.layer_sparsity(model)
    assert len(layers) == len(weights) == 19  # the patterns alone: no conv layer (GateConfig.for_method)
    for layer in layers:
        assert layer.pruned == round(0.65 * layer.numel), layer.name
        # the pruned entries are the smallest in magnitude
        module, _ = gates.gated_modules(model)[layer.name]
        mask = gates.module_hard_mask(module)
        w = weights[layer.name].abs()
        assert w[~mask].max() <= w[mask].min()
    model.train()
    assert gates.achieved_sparsity(model) == pytest.approx(0.65, abs=1e-4)
    assert not [p for p in model.parameters() if p.numel() == 1]  # ump adds no parameter


def test_calibration_hits_target_and_keeps_layers_mixed():
    model, found = gated_model(threshold=0.5)
    # make layers differ, as training would
    for i, gate in enumerate(found.values()):
        gate.threshold.data.fill_(0.3 + 0.03 * i)
    thresholds_before = torch.stack([g.threshold.detach().clone() for g in found.values()])
    measured_before = gates.achieved_sparsity(model)
    before, after = gates.calibrate_thresholds(model, 0.65)
    assert before == measured_before and abs(before - 0.65) > 0.05
    assert abs(after - 0.65) < 1e-3
    assert after == gates.achieved_sparsity(model)
    # one common factor for all thresholds: the learned mixture of layers is kept
    ratios = torch.stack([g.threshold.detach() for g in found.values()]) / thresholds_before
    torch.testing.assert_close(ratios, ratios[0].expand_as(ratios))
    per_layer = [l.sparsity for l in gates.layer_sparsity(model)]
    assert max(per_layer) - min(per_layer) > 0.2


def test_schedules():
    cfg = GateConfig(tau_start=0.1, tau_end=0.001, target_warmup_fraction=0.5)
    assert gates.tau_at(0, 100, cfg) == pytest.approx(0.1)
    assert gates.tau_at(50, 100, cfg) == pytest.approx(0.01)
    assert gates.tau_at(100, 100, cfg) == pytest.approx(0.001)
    targets = [gates.target_at(s, 100, 0.65, cfg, start=0.1) for s in range(0, 101, 5)]
    assert targets[0] == pytest.approx(0.1) and targets[10] == pytest.approx(0.65) and targets[-1] == 0.65
    assert targets == sorted(targets)
    steps = [b - a for a, b in zip(targets, targets[1:11])]
    assert steps == sorted(steps, reverse=True)  # eases out: slower near the target


def test_bad_settings_name_the_setting():
    model, _ = load_model("tiny")
    with pytest.raises(ConfigError) as err:
        gates.attach_gates(model, GateConfig(patterns=[r".*no_such_module", r".*q_proj", "("]))
    text = str(err.value)
    assert "gates.patterns[0]" in text and "no_such_module" in text and "gates.patterns[2]" in text
    assert "gates.patterns[1]" not in text

    with pytest.raises(ConfigError, match="tau_end"):
        gates.attach_gates(model, GateConfig(tau_start=0.01, tau_end=0.1))

    class NotSpeech(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

    with pytest.raises(ConfigError, match=r"gates.patterns\[0\].*matches no nn.Linear"):
        gates.attach_gates(NotSpeech(), GateConfig())

    gates.attach_gates(model, GateConfig())
    with pytest.raises(ValueError, match="already carries gates"):
        gates.attach_gates(model, GateConfig())


@pytest.mark.slow
def test_compiled_gate_kernels_equal_eager():
    """Large CPU weights run the two kernels through torch.compile (a dynamic-shape graph); the math
    must not change. The GPU's static graphs on CUDA tensors: test_gpu_path.py, where a GPU is."""
    device_type = "cpu"
    generator = torch.Generator().manual_seed(0)
    weight, grad_out = torch.randn(48, 144, generator=generator), torch.randn(48, 144, generator=generator)
    threshold, tau, grad_sum = torch.tensor(0.8), torch.tensor(0.02), torch.tensor(0.3)
    forward = masks._compiled_kernel(masks._soft_mask_forward, device_type)
    backward = masks._compiled_kernel(masks._soft_mask_backward, device_type)
    eager_fwd, compiled_fwd = masks._soft_mask_forward(weight, threshold, tau), forward(weight, threshold, tau)
    for a, b in zip(eager_fwd, compiled_fwd):
        torch.testing.assert_close(a, b)
    inv_scale = eager_fwd[2]
    for regrow in (False, True):  # gates.regrow: the other weight gradient
        for a, b in zip(masks._soft_mask_backward(grad_out, grad_sum, weight, threshold, inv_scale, tau, regrow),
                        backward(grad_out, grad_sum, weight, threshold, inv_scale, tau, regrow)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_shared_threshold_is_one_parameter_for_every_gated_matrix():
    """The control of the learned allocation: one relative threshold moves every layer together."""
    from pinch_ray.config import TrainConfig
    from pinch_ray.core.compressor import Compressor

    model, _ = load_model("tiny")
    run = Compressor.create(model, "sspg", 0.65, TrainConfig(max_steps=10, warmup_steps=1),
                            GateConfig(shared_threshold=True, threshold_init=0.8))
    thresholds = {id(gate.threshold) for gate in gates.gates_of(run.model)}
    assert len(thresholds) == 1 and len(gates.gates_of(run.model)) == 24
    (group,) = run.threshold_optimizer.param_groups
    assert len(group["params"]) == 1
    batch = {"input_values": torch.randn(2, 16_000), "labels": torch.randint(5, 32, (2, 8))}
    run.step([batch])
    values = {round(gate.threshold.item(), 9) for gate in gates.gates_of(run.model)}
    assert len(values) == 1 and values != {0.8}  # moved, together
    # calibration scales it like any threshold: the target is met, the thresholds stay one
    before, after = gates.calibrate_thresholds(run.unwrapped, run.gated_target)
    assert abs(after - run.gated_target) < 1e-3 and len({id(g.threshold) for g in gates.gates_of(run.model)}) == 1
    per_layer = [layer.sparsity for layer in gates.layer_sparsity(run.model)]
    assert max(per_layer) - min(per_layer) < 0.15  # the same relative cut: only the weight shapes differ
