"""The peers of sspg (gmp, movement, parp): exact targets on the export, stock loading, resume,
each method's own rule; and the training-loop fixes that came with them (clipping, the thresholds'
schedule, the masked update)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pinch_ray.config import GateConfig, TrainConfig
from pinch_ray.core import export, gates, peers
from pinch_ray.core.compressor import Compressor
from pinch_ray.core.models import count_parameters, load_model

from conftest import benchmark
from test_export import STOCK_LOADER, audio
from test_train import NO_RANDOMNESS, random_batches

PEERS = ("gmp", "movement", "parp")


def compressor(method, target=0.65, steps=12, gate_cfg=None, seed=0, **train):
    model, processor = load_model("tiny", seed=seed, **NO_RANDOMNESS)
    train_cfg = TrainConfig(max_steps=steps, lr=1e-3, **{"warmup_steps": 2, **train})
    gate_cfg = gate_cfg or GateConfig(calibrate=False, mask_update_every=3)
    return Compressor.create(model, method, target, train_cfg, gate_cfg), processor


@pytest.mark.parametrize("method", PEERS)
def test_each_peer_reaches_its_target_exactly_on_the_export_that_stock_transformers_loads(tmp_path, method):
    run, processor = compressor(method, steps=12)
    history = [run.step([batch]) for batch in random_batches(12, batch=2, seconds=0.5)]
    result = run.finish()
    assert not result["calibrated"] and result["achieved_sparsity"] == result["achieved_sparsity_trained"]
    model = run.model.eval()
    inputs = audio()
    with torch.no_grad():
        hard_masked_logits = model(inputs).logits
    plain = export.pruned_copy(model)
    export.export_model(plain, processor, tmp_path / "model")
    counts = count_parameters(plain)  # measured on the export: exact zeros of the folded weights
    gated_zeros = round(run.gated_target * run.params_gated)  # global ranking: exactly this many
    assert counts.total - counts.nonzero == gated_zeros
    assert abs((counts.total - counts.nonzero) / counts.total - 0.65) < 1 / counts.total
    # the mask schedule: gmp and movement ramp (cubic) up to the target, parp holds it from the start
    ranked = [m["mask_sparsity"] for m in history if "mask_sparsity" in m]
    if method == "parp":
        assert ranked == [pytest.approx(run.gated_target)] * 4  # steps 3, 6, 9, 12
    else:
        assert ranked == sorted(ranked) and ranked[0] < run.gated_target and ranked[-1] == run.gated_target
    np.save(tmp_path / "inputs.npy", inputs.numpy())
    np.save(tmp_path / "logits.npy", hard_masked_logits.numpy())
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    loaded = subprocess.run([sys.executable, "-c", STOCK_LOADER, str(tmp_path / "model"), str(tmp_path / "inputs.npy"),
                             str(tmp_path / "logits.npy")], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert float(loaded.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.parametrize("method", PEERS)
def test_a_killed_and_resumed_peer_gives_the_same_masks_and_weights(method):
    batches = list(random_batches(8, batch=2, seconds=0.5))
    straight, _ = compressor(method, steps=8)
    for batch in batches:
        straight.step([batch])
    first, _ = compressor(method, steps=8)
    for batch in batches[:4]:  # killed after step 4 (a mask update at step 3, the next due at 6)
        first.step([batch])
    state = first.state_dict()
    resumed, _ = compressor(method, steps=8, seed=123)  # other weights, overwritten by the checkpoint
    resumed.load_state_dict(state)
    for batch in batches[4:]:
        resumed.step([batch])
    masks = [(name, mask.mask) for name, (_, mask) in gates.gated_modules(straight.model).items()]
    assert masks and 0 < sum(int((~m).sum()) for _, m in masks)
    for (name, mask), (_, (_, other)) in zip(masks, gates.gated_modules(resumed.model).items()):
        assert torch.equal(mask, other.mask), name
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_gmp_follows_the_cubic_schedule_and_a_pruned_weight_stays_pruned():
    assert [peers.cubic_sparsity(s, 10, 0.8) for s in (0, 5, 10, 20)] == pytest.approx([0, 0.7, 0.8, 0.8])
    schedule = peers.MaskSchedule("gmp", 0.8, max_steps=20, cfg=GateConfig(mask_update_every=3))
    assert [s for s in range(1, 21) if schedule.due(s)] == [3, 6, 9, 10]  # then frozen: the rest recover
    movement = peers.MaskSchedule("movement", 0.8, max_steps=20, cfg=GateConfig(mask_update_every=3))
    assert [s for s in range(1, 21) if movement.due(s)] == [3, 6, 9, 10, 12, 15, 18, 20]
    run, _ = compressor("gmp", steps=12)
    pruned_before = None
    for step, batch in enumerate(random_batches(12, batch=2, seconds=0.5), start=1):
        run.step([batch])
        pruned = {name: ~mask.mask.clone() for name, (_, mask) in gates.gated_modules(run.model).items()}
        if pruned_before is not None:
            assert all(torch.all(pruned[name] >= was) for name, was in pruned_before.items()), step
        pruned_before = pruned
    # global ranking: one magnitude cut over every matrix, so the layers end at different sparsities
    per_layer = [layer.sparsity for layer in gates.layer_sparsity(run.model)]
    assert max(per_layer) - min(per_layer) > 0.05


def test_layer_ranking_prunes_every_matrix_to_the_same_fraction():
    run, _ = compressor("gmp", steps=3, gate_cfg=GateConfig(mask_ranking="layer", mask_update_every=3,
                                                            target_warmup_fraction=0.0))
    for batch in random_batches(3, batch=2, seconds=0.5):
        run.step([batch])
    per_layer = [layer.sparsity for layer in gates.layer_sparsity(run.model)]
    assert max(per_layer) - min(per_layer) < 0.002 and per_layer[0] == pytest.approx(run.gated_target, abs=0.002)
    assert "gates.mask_ranking" in str(GateConfig(mask_ranking="nearest").problems())
    assert "gates.mask_update_every" in str(GateConfig(mask_update_every=0).problems())


def test_movement_scores_accumulate_the_straight_through_movement_and_rank_the_mask():
    weight = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    mask = peers.MovementMask(weight)
    mask.mask[0, 3] = False  # a pruned weight still gets a score gradient (straight through)
    masked = mask(weight.clone().requires_grad_())
    upstream = torch.tensor([[0.5, 0.5, -1.0, -1.0]])
    masked.backward(upstream)
    assert torch.equal(mask.scores.grad, upstream * weight)  # dL/dS = dL/dW' * W
    module = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(weight)
    peers.attach_ranked_masks(module, "movement", {"": module})
    out = module(torch.ones(1, 4))
    out.backward(torch.tensor([[1.0]]))  # dL/dW' = 1 everywhere: S = -W after one step
    peers.accumulate_movement(module)
    (_, gate), = peers.ranked_masks(module)
    assert torch.equal(gate.scores, -weight) and gate.scores.grad is None
    peers.update_masks(module, 0.5)  # keeps the two largest scores, 2.0 and -0.5 (weights -2.0 and 0.5)
    assert gate.mask.tolist() == [[False, True, True, False]]
    # the scores are trained by accumulation, not by the weights' AdamW, and never clipped with them
    run, _ = compressor("movement", steps=4)
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in peers.score_parameters(run.model)}


def test_parp_zeroes_what_it_prunes_and_lets_it_grow_back_until_the_next_re_prune():
    run, _ = compressor("parp", steps=12)  # one-shot prune to the target before the first step
    (module, gate), *_ = peers.ranked_masks(run.model)
    original = module.parametrizations.weight.original
    zeroed = ~gate.mask
    assert zeroed.any() and torch.all(original[zeroed] == 0)
    assert run.hard_sparsity() == pytest.approx(run.gated_target, abs=1e-6)
    run.step([next(random_batches(1, batch=2, seconds=0.5))])  # step 1: no re-prune yet
    assert (original.detach()[zeroed] != 0).any()  # the adjust phase updates the pruned weights too
    with torch.no_grad():
        run.model.eval()
        assert torch.equal(module.weight, original * gate.mask)  # evaluation uses the mask
        run.model.train()


def test_clipping_takes_the_weights_norm_alone_and_the_thresholds_apart():
    run, _ = compressor("sspg", steps=5)
    weights = [p for g in run.optimizer.param_groups for p in g["params"]]
    thresholds = [g.threshold for g in gates.gates_of(run.model)]
    for p in weights:
        p.grad = torch.full_like(p, 1e-4)
    for t in thresholds:
        t.grad = torch.full_like(t, 50.0)  # a sparsity term many times the weights' gradient
    weight_norm = torch.nn.utils.get_total_norm([p.grad for p in weights])
    assert weight_norm < 1.0  # under max_grad_norm: the weights' gradients must stay as they are
    norms = run._clip_gradients()
    assert norms[0] == pytest.approx(weight_norm.item()) and norms[1].item() == pytest.approx(50.0 * len(thresholds) ** 0.5)
    assert all(torch.all(p.grad == 1e-4) for p in weights)  # clipped together, they would shrink ~300x
    assert all(t.grad.item() == 50.0 for t in thresholds)  # threshold_max_grad_norm 0: not clipped
    run.gate_cfg = GateConfig(calibrate=False, threshold_max_grad_norm=1.0)
    run._clip_gradients()
    assert torch.nn.utils.get_total_norm([t.grad for t in thresholds]).item() == pytest.approx(1.0, rel=1e-4)


def test_the_thresholds_can_keep_their_full_rate_while_the_weights_warm_up():
    for schedule, expected in (("lr", 0.5), ("constant", 1.0)):
        run, _ = compressor("sspg", steps=10, warmup_steps=2, gate_cfg=GateConfig(threshold_schedule=schedule))
        run.step([next(random_batches(1, batch=2, seconds=0.5))])  # step 0: half the warm-up
        (group,) = run.threshold_optimizer.param_groups
        assert group["lr"] == pytest.approx(expected * group["base_lr"])
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * run.train_cfg.lr)


class PinchedStep:
    """The largest gated matrix of ``model`` before an optimizer step, its weights split by their
    soft mask into those the gates pinch (20x to 10,000x less gradient, far above AdamW's eps) and
    those they keep; :meth:`ratio`, after the step: how far the pinched moved, over the kept."""

    def __init__(self, model):
        module, gate = max(gates.gated_modules(model).values(), key=lambda item: item[1].numel)
        self.weight = module.parametrizations.weight.original
        soft = gate.soft_mask(self.weight.detach())
        self.before = self.weight.detach().clone()
        self.pinched, self.kept = (soft > 1e-4) & (soft < 0.05), soft > 0.999
        assert self.pinched.sum() > 20 and self.kept.sum() > 20

    def ratio(self) -> float:
        change = (self.weight.detach() - self.before).abs()
        return change[self.pinched].mean().item() / change[self.kept].mean().item()


# gates.threshold_init 1.0: a start with many weights well under their thresholds
PINCHING = {"threshold_init": 1.0, "calibrate": False}


def test_masked_update_holds_a_weight_under_its_threshold_where_adam_would_move_it():
    """The pipeline's step (the Compressor); the plain loop and the Trainer: test_api.py."""
    moved = {}
    for masked_update in (False, True):
        run, _ = compressor("sspg", steps=10, gate_cfg=GateConfig(masked_update=masked_update, **PINCHING))
        step = PinchedStep(run.model)
        run.step([next(random_batches(1, batch=2, seconds=0.5))])
        moved[masked_update] = step.ratio()
    assert moved[False] > 0.5  # AdamW's normalisation: a pinched weight takes a near-full step
    assert moved[True] < 0.05  # scaled by its mask


def test_time_to_common_quality_is_read_from_the_curves_so_every_arm_reaches_it():
    """The benchmark crashed when an arm's plateau (0.123456) was kept apart from its curve, which
    stored it rounded up (0.1235): the arm never "reached" its own plateau."""
    compression_time = benchmark("compression_time")
    sspg = [[50, 10.0, 0.2, 0.2], [100, 20.0, 0.12, 0.123456], [150, 30.0, 0.13, 0.125]]
    two_stage = [[50, 5.0, 0.3, 0.3], [100, 9.0, 0.11, 0.11]]
    quality, reached = compression_time.seconds_to_common_quality({"sspg": (sspg, 0.0), "two-stage": (two_stage, 100.0)})
    assert quality == 0.123456 and reached == {"sspg": 20.0, "two-stage": 109.0}
    assert compression_time.rounded_curve(sspg)[1] == [100, 20.0, 0.12, 0.1235]
    with pytest.raises(ValueError, match=r"\['gmp'\] recorded no dev WER"):
        compression_time.seconds_to_common_quality({"sspg": (sspg, 0.0), "gmp": ([], 0.0)})


def test_peers_are_timed_to_the_quality_sspg_and_two_stage_share_and_cannot_lower_it():
    """A peer whose plateau (0.1234561) is a hair worse than the common quality (0.123456) never
    reaches it: null on that seed, left out of the mean, and the bar for sspg and two-stage stays."""
    compression_time = benchmark("compression_time")
    slow_but_good = [[50, 4.0, 0.2, 0.2], [100, 30.0, 0.11, 0.12]]
    plateau_a_hair_worse = [[50, 4.0, 0.12, 0.1234561]]
    seeds = [compression_time.peer_time(slow_but_good, 0.123456, 20.0, 109.0),
             compression_time.peer_time(plateau_a_hair_worse, 0.123456, 20.0, 109.0)]
    assert seeds[0] == {"s_to_quality": 30.0, "ratio_vs_sspg": 1.5, "ratio_vs_two_stage": 0.275}
    assert seeds[1] == {"s_to_quality": None, "ratio_vs_sspg": None, "ratio_vs_two_stage": None}
    summary = compression_time.summarize_peer([{**seed, "word_errors": 10} for seed in seeds])
    assert summary == {"ratios_vs_sspg": [1.5, None], "reached": "1/2", "ratio_vs_sspg_mean": 1.5,
                       "ratio_vs_sspg_std": None, "word_errors": 20}
    assert compression_time.summarize_peer([{**seeds[1], "word_errors": 1}])["ratio_vs_sspg_mean"] is None
