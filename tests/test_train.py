"""The core training step: sspg hits its target, the three methods, accumulation, resume."""

import subprocess
import sys

import pytest
import torch

from pinch_ray.core import gates
from pinch_ray.config import ConfigError, GateConfig, TrainConfig
from pinch_ray.core.models import count_parameters, load_model
from pinch_ray.core.compressor import (
    Compressor,
    SharedScaleAdam,
    build_optimizers,
    gated_target,
    lr_multiplier,
    prepare_method,
)

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     feat_proj_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0)


def random_batches(n, batch=4, seconds=1.0, seed=0):
    """Random audio with random transcripts: enough for a CTC gradient, no corpus needed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield {"input_values": torch.randn(batch, int(seconds * 16_000), generator=generator),
               "labels": torch.randint(5, 32, (batch, 12), generator=generator)}


def compressor(method, target, steps, preset="tiny", seed=0, target_basis="params", **train):
    model, _ = load_model(preset, seed=seed, **NO_RANDOMNESS)
    train_cfg = TrainConfig(max_steps=steps, warmup_steps=20, lr=1e-3, **train)
    return Compressor.create(model, method, target, train_cfg, GateConfig(calibrate=False), target_basis=target_basis)


@pytest.mark.slow
def test_sspg_reaches_target_with_mixed_per_layer_sparsity():
    run = compressor("sspg", 0.65, steps=300)
    history = [run.step([batch]) for batch in random_batches(300)]
    gated = gates.achieved_sparsity(run.model)  # measured from hard masks, no calibration
    counts = count_parameters(run.model)
    achieved = 1 - counts.nonzero / counts.total  # 65% of ALL parameters, as the paper counts
    assert abs(achieved - 0.65) <= 0.005, achieved
    assert run.gated_target == pytest.approx(0.65 * counts.total / counts.gated) and abs(gated - run.gated_target) < 0.006
    per_layer = [layer.sparsity for layer in gates.layer_sparsity(run.model)]
    assert max(per_layer) - min(per_layer) > 0.05, per_layer
    # the run followed the ramp: halfway through it had pruned a fair part, not all, of the target
    assert 0.3 < history[75]["soft_sparsity"] < 0.65
    assert history[-1]["tau"] == pytest.approx(GateConfig().tau_end, rel=0.05)
    assert run.finish() == {"achieved_sparsity_trained": pytest.approx(achieved), "gated_sparsity": gated,
                            "achieved_sparsity": pytest.approx(achieved), "calibrated": False}


@pytest.mark.parametrize("method", ["sspg", "ump", "sspg-neuron"])
def test_a_target_of_all_parameters_becomes_the_gated_fraction_that_removes_them(method):
    model, _ = load_model("tiny")
    total = sum(p.numel() for p in model.parameters())
    fraction, params_total, params_gated = prepare_method(model, method, 0.65, GateConfig(), "params")
    gated = {name: gate for name, (_, gate) in gates.gated_modules(model).items()}
    expected_gated = sum(getattr(g, "numel", None) or g.mask.numel() for g in gated.values())
    assert (params_total, params_gated) == (total, expected_gated)
    assert fraction == pytest.approx(0.65 * total / params_gated) and fraction > 0.65
    if method == "ump":  # the masks remove exactly that fraction: 65% of all parameters
        assert 1 - count_parameters(model).nonzero / total == pytest.approx(0.65, abs=20 / total)
    model, _ = load_model("tiny")
    assert prepare_method(model, method, 0.65, GateConfig(), "gated")[0] == 0.65


def test_a_target_the_gated_layers_cannot_reach_is_refused_with_the_largest_that_they_can():
    with pytest.raises(ConfigError, match=r"at most 0\.977 is reachable"):
        compressor("sspg", 0.98, steps=5)  # sspg's gates hold 98.7% of the tiny model
    with pytest.raises(ConfigError, match=r"at most 0\.884 is reachable.*no conv layer"):
        compressor("ump", 0.9, steps=5)  # ump's masks 89.3%: the patterns alone
    assert gated_target(0.5, "params", 1000, 800) == 0.625
    assert gated_target(0.5, "gated", 1000, 800) == 0.5


def test_lambda_rises_with_the_gap_by_the_same_amount_per_run_whatever_its_length():
    """Plain gradient ascent at lagrangian_gain / max_steps: a gap held for a whole run moves
    lambda_1 by lagrangian_gain x gap, for a short run and one 10x longer alike (Adam would move
    it ~lr per step: 10x further in the longer run)."""
    for max_steps in (100, 1000):
        lagrangian = gates.SparsityLagrangian(penalty=0.0)
        for _ in range(max_steps):
            lagrangian(torch.tensor(0.51), 0.5).backward()
            lagrangian.ascend(GateConfig().lagrangian_gain / max_steps)
        assert lagrangian.lambda_1.item() == pytest.approx(GateConfig().lagrangian_gain * 0.01, rel=1e-3)
        assert lagrangian.lambda_1.grad is None


def test_finish_calibrates_a_missed_target_and_reports_both():
    run = compressor("sspg", 0.65, steps=10)
    run.gate_cfg.calibrate = True
    for batch in random_batches(3):
        run.step([batch])
    result = run.finish()
    assert result["calibrated"] and result["achieved_sparsity_trained"] < 0.3
    assert abs(result["achieved_sparsity"] - 0.65) < 1e-3


@pytest.mark.parametrize("method,target", [("dense", 0.0), ("ump", 0.65), ("sspg", 0.5), ("sspg-neuron", 0.5)])
def test_every_method_runs_through_the_same_step(method, target):
    run = compressor(method, target, steps=6)
    before = [p.detach().clone() for p in run.model.parameters()]
    metrics = [run.step([batch]) for batch in random_batches(6)]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(m["ctc_loss"])) for m in metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    if method == "ump":  # the mask stays fixed while the rest fine-tunes: 65% of all parameters
        assert run.on_basis(run.hard_sparsity()) == pytest.approx(0.65, abs=1e-4)
        assert run.hard_sparsity() == pytest.approx(run.gated_target, abs=1e-4) and run.gated_target > 0.72
    if method.startswith("sspg"):
        assert {"soft_sparsity", "sparsity_loss", "target_now", "tau", "lambda_1"} <= set(metrics[-1])
    if method == "dense":
        assert run.hard_sparsity() == 0.0 and "soft_sparsity" not in metrics[-1]


def test_optimizer_groups_and_lr_schedule():
    run = compressor("sspg", 0.65, steps=100)
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert set(groups) == {"weights", "no_decay"}  # lambda_1 ascends on its own (see above)
    assert run.optimizer.defaults["fused"] is True  # one kernel, not a Python loop over the tensors
    (thresholds,) = run.threshold_optimizer.param_groups
    assert isinstance(run.threshold_optimizer, torch.optim.AdamW) and len(thresholds["params"]) == 24
    assert thresholds["lr"] == pytest.approx(4.0 / 100) and thresholds["weight_decay"] == 0
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])

    cfg = TrainConfig(max_steps=100, warmup_steps=10, decay_fraction=0.3)
    values = [lr_multiplier(s, cfg) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0 and values[69] == 1.0
    assert values[70:] == sorted(values[70:], reverse=True) and values[-1] < 0.01


def test_shared_scale_thresholds_move_by_their_own_gradients_where_adam_moves_all_alike():
    """Two thresholds whose gradients differ 4x: Adam moves both ~lr a step; the shared second moment
    keeps the 4x, which is what lets each layer's pruning follow its own cost."""
    for optimizer_class, expected_ratio in ((torch.optim.Adam, 1.0), (SharedScaleAdam, 4.0)):
        small, large = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))
        optimizer = optimizer_class([small, large], lr=0.01)
        for _ in range(20):
            small.grad, large.grad = torch.tensor(0.1), torch.tensor(0.4)
            optimizer.step()
        assert large.item() / small.item() == pytest.approx(expected_ratio, rel=1e-4)
        # the overall scale: Adam lr per step each; shared, lr x gradient / rms of both gradients
        scale = 1.0 if expected_ratio == 1 else ((0.1 + 0.4) / 2) / ((0.1**2 + 0.4**2) / 2) ** 0.5
        assert (small.item() + large.item()) / 2 == pytest.approx(-0.01 * 20 * scale, rel=1e-3)
    cfg = GateConfig(threshold_update="shared")
    run = Compressor.create(load_model("tiny")[0], "sspg", 0.5, TrainConfig(max_steps=10), cfg)
    assert isinstance(run.threshold_optimizer, SharedScaleAdam)
    assert "gates.threshold_update" in str(GateConfig(threshold_update="sgd").problems())


def test_gradient_accumulation_matches_one_big_batch():
    """The gradients themselves, as the optimizers receive them (no clipping): one AdamW step is
    scale-free, so a missing or doubled 1/n would pass a comparison of the weights after it."""
    big = next(random_batches(1, batch=4))
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    gradients = []
    for accumulation, micro_batches in ((1, [big]), (2, halves)):
        run = compressor("sspg", 0.5, steps=10, grad_accum_steps=accumulation, max_grad_norm=1e9)
        seen = {}
        for optimizer in run.optimizers:
            def record(step=optimizer.step, optimizer=optimizer):
                for group in optimizer.param_groups:
                    seen.update({id(p): p.grad.clone() for p in group["params"] if p.grad is not None})
                return step()
            optimizer.step = record
        run.step(micro_batches)
        names = {id(p): name for name, p in run.model.named_parameters()}
        gradients.append({names[key]: grad for key, grad in seen.items()})
    one, accumulated = gradients
    assert one.keys() == accumulated.keys() and any(name.endswith("threshold") for name in one)
    for name, grad in one.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-7, rtol=1e-4, msg=name)
    assert sum(float(g.norm()) for g in one.values()) > 1e-2  # gradients that a wrong scale would show in


@pytest.mark.parametrize("threshold_update", ["adam", "shared"])
def test_resume_from_state_dict_continues_exactly(threshold_update):
    batches = list(random_batches(8))

    def make(target=0.65, **kwargs):
        run = compressor("sspg", target, steps=8, **kwargs)
        if threshold_update == "shared":  # the thresholds' optimizer, rebuilt as the option builds it
            run.gate_cfg = GateConfig(calibrate=False, threshold_update="shared")
            run.optimizer, run.threshold_optimizer = build_optimizers(run.model, run.train_cfg, run.gate_cfg)
        return run

    straight = make()
    for batch in batches:
        straight.step([batch])

    first = make()
    for batch in batches[:4]:
        first.step([batch])
    state = first.state_dict()
    resumed = make(seed=123)  # different init, overwritten by the state
    resumed.load_state_dict(state)
    assert resumed.step_count == 4
    for batch in batches[4:]:
        resumed.step([batch])
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert resumed.lagrangian.lambda_1.item() == pytest.approx(straight.lagrangian.lambda_1.item())

    with pytest.raises(ValueError, match="sspg@0.65"):
        make(target=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\(params\), not sspg@0.65 \(gated\)"):
        compressor("sspg", 0.65, steps=8, target_basis="gated").load_state_dict(state)


@pytest.mark.parametrize("method,target,key", [("sspg", 1.2, "target_sparsity"), ("sspg", -0.1, "target_sparsity"),
                                               ("prune", 0.5, "method"), ("dense", 0.5, "target_sparsity")])
def test_bad_method_settings_are_named(method, target, key):
    with pytest.raises(ConfigError, match=key):
        compressor(method, target, steps=5)


def test_bad_training_settings_are_all_listed():
    model, _ = load_model("tiny")
    with pytest.raises(ConfigError) as err:
        Compressor.create(model, "sspg", 0.5, TrainConfig(max_steps=0, lr=-1.0, threshold_lr=0.0), GateConfig())
    assert len(err.value.problems) == 3
    assert all(k in str(err.value) for k in ("training.max_steps", "training.lr", "training.threshold_lr"))


def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_in_every_step():
    """A step's large tensors come back every step; glibc's default gives freed memory back to the
    OS above a small heap peak, so each step page-faults them in again (measured in a fresh process)."""
    code = """
import resource, torch
from pinch_ray.core.compressor import keep_freed_cpu_memory

def faults_per_cycle(cycles=3):
    def cycle():  # 10 x 12 MB alive at once, then freed: the shape of one training step
        tensors = [torch.ones(3_000_000) for _ in range(10)]
        del tensors
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        cycle()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / cycles

default = faults_per_cycle()
assert keep_freed_cpu_memory() and keep_freed_cpu_memory()
print(default, faults_per_cycle())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    default, kept = map(float, result.stdout.split())
    assert default > 3_000  # ~10k 4 KiB pages (40 MB of the 120 MB) faulted in again every cycle
    assert kept < 0.05 * default


def test_distillation_teaches_from_a_frozen_copy_of_the_start_and_never_the_dense_reference():
    from pinch_ray.core.distill import Distiller

    batch = next(random_batches(1, batch=2, seconds=1.0, seed=3))
    batch["attention_mask"] = torch.ones_like(batch["input_values"], dtype=torch.long)
    batch["attention_mask"][1, 8000:] = 0  # the second utterance is half padding
    model, _ = load_model("tiny", seed=0, **NO_RANDOMNESS)
    distiller = Distiller.create(model, logits_weight=1.0, hidden_weight=1.0, layers=[1, -1])
    model.eval()
    with torch.no_grad():  # the student is still the teacher: both terms are exactly zero
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        total, terms = distiller.loss(model(**inputs, output_hidden_states=True), inputs)
    assert terms["distill_logits"].item() == pytest.approx(0.0, abs=1e-6)
    # L1 0 and cosine 1: -log sigmoid(1) is the hidden term's floor
    assert terms["distill_hidden"].item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.0)).item(),
                                                           abs=1e-5)

    train = dict(distill_logits=1.0, distill_hidden=0.5, distill_layers=[-1])
    run = compressor("sspg", 0.5, 4, **train)
    teacher_before = {k: v.clone() for k, v in run.distiller.teacher.state_dict().items()}
    metrics = [run.step([b]) for b in random_batches(3, batch=2, seed=1)]
    assert all(m["distill_logits"] > 0 and m["distill_hidden"] > 0 for m in metrics[1:])  # gates move the student
    teacher_after = run.distiller.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)  # frozen
    assert not any(p.requires_grad for p in run.distiller.teacher.parameters())
    assert not gates.gated_modules(run.distiller.teacher)  # the model as the trial started: no gates
    assert "distill_logits" not in run.state_dict()["model"] and not any(
        "teacher" in key for key in run.state_dict()["model"])  # not part of a checkpoint

    assert compressor("dense", 0.0, 4, **train).distiller is None  # plain fine-tuning, the fair reference
    model, _ = load_model("tiny", seed=0, **NO_RANDOMNESS)  # a new CTC head teaches nothing: hidden states only
    fresh_head = Compressor.create(model, "ump", 0.5, TrainConfig(max_steps=4, **train), GateConfig(),
                                   teacher_has_head=False)
    assert fresh_head.distiller.logits_weight == 0 and fresh_head.distiller.hidden_weight == 0.5
    assert "distill_logits" not in fresh_head.step([next(random_batches(1, batch=2))])


def test_distillation_settings_are_checked():
    problems = TrainConfig(distill_logits=-1.0, distill_temperature=0.0, distill_layers=[2]).problems()
    assert any("training.distill_logits: must be >= 0" in p for p in problems)
    assert any("training.distill_temperature: must be > 0" in p for p in problems)
    assert any("training.distill_layers: set, but distill_hidden is 0" in p for p in problems)
    model, _ = load_model("tiny", **NO_RANDOMNESS)  # 3 layers: hidden_states has 4 entries
    with pytest.raises(ValueError, match=r"training.distill_layers: \[4\] out of range .* 3 layers"):
        Compressor.create(model, "sspg", 0.5, TrainConfig(distill_hidden=1.0, distill_layers=[0, 3, -4, 4]),
                          GateConfig())
