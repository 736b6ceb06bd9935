"""Neuron-granularity gates: whole FFN neurons and attention heads, physically removed on export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCTC

from pinch_ray.core import compact_format, export, gates, neurons, pruned_modeling
from pinch_ray.config import ConfigError, GateConfig
from pinch_ray.core.models import count_parameters, load_model

from test_train import compressor, random_batches

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     feat_proj_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0)
UNITS = {"tiny": ["ffn", "heads", "conv"], "tiny-hubert": ["ffn", "heads"], "tiny-wavlm": ["ffn", "conv"]}


def audio(batch=2, seconds=1.0, seed=0):
    return torch.randn(batch, int(seconds * 16_000), generator=torch.Generator().manual_seed(seed))


def neuron_model(arch="tiny", threshold=0.9, **overrides):
    model, processor = load_model(arch, **NO_RANDOMNESS, **overrides)
    found = gates.attach_gates(model, GateConfig(granularity="neuron", neuron_units=UNITS[arch],
                                                 threshold_init=threshold))
    return model, processor, found


@pytest.mark.parametrize("arch", list(UNITS))
def test_one_threshold_per_layer_and_unit_kind_and_gradients_reach_them(arch):
    model, _, found = neuron_model(arch)
    layers = model.config.num_hidden_layers
    assert len(found) == layers * len(UNITS[arch])
    assert all(p.numel() == 1 for name, p in model.named_parameters() if "threshold" in name)
    assert sum(1 for name, _ in model.named_parameters() if "threshold" in name) == len(found)
    model.train()
    labels = torch.randint(5, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    loss = model(audio(), labels=labels).loss + gates.soft_sparsity(model)
    loss.backward()
    for gate in found.values():
        assert gate.threshold.grad is not None and gate.threshold.grad != 0
        # the units' rows get gradient through the mask too (self-pinching), not only through CTC
        assert all(neurons.raw_weight(m).grad is not None and neurons.raw_weight(m).grad.abs().sum() > 0
                   for m in gate.sources)


def test_unit_thresholds_start_under_the_lowest_unit_so_a_trained_model_can_move_them():
    """On a trained model every unit scores far above the weights' initial threshold (t^2 = 0.01):
    their soft masks saturate at 1 and the threshold gets no gradient. Unit gates start just under
    their layer's lowest unit instead."""
    model, _ = load_model("synth-tiny", **NO_RANDOMNESS)
    found = gates.attach_gates(model, GateConfig(granularity="neuron", tau_start=0.01))  # the demo's tau
    assert {gate.kind for gate in found.values()} == {"ffn", "heads", "conv"}
    for gate in found.values():
        scores = gate.relative_scores().detach()
        assert float(scores.min()) > 0.15  # the weights' start, 0.1^2, is far below every unit
        assert float(gate.threshold) ** 2 == pytest.approx(neurons.UNIT_THRESHOLD_START * float(scores.min()), rel=1e-5)
    model.train()
    gates.soft_sparsity(model).backward()
    assert all(gate.threshold.grad.abs() > 0 for gate in found.values())
    with torch.no_grad():  # where the weights' threshold starts, nothing would move
        for gate in found.values():
            gate.threshold.grad = None
            gate.threshold.fill_(GateConfig().threshold_init)
    gates.soft_sparsity(model).backward()
    assert all(gate.threshold.grad == 0 for gate in found.values() if gate.kind in ("ffn", "heads"))


def test_unit_noise_draws_masks_that_reach_units_away_from_the_threshold():
    """gates.unit_noise: with a cold mask only the units inside the sigmoid's narrow band learn what
    they cost; logistic noise on the scores of the training forward moves that band from draw to
    draw, so many more units get a gradient; evaluation (the hard mask) has no noise."""
    model, _ = load_model("synth-tiny", **NO_RANDOMNESS)
    found = gates.attach_gates(model, GateConfig(granularity="neuron", neuron_units=["ffn"], tau_start=0.01,
                                                 unit_noise=0.1))
    gate = next(iter(found.values()))  # its threshold where training starts: under the lowest unit
    quiet = gate.unit_soft_mask().detach()  # no draw (what noise 0 gives)
    gate.noise = 0.0
    torch.testing.assert_close(gate.unit_soft_mask(sample=True).detach(), quiet)
    gate.noise = 0.1

    def banded(mask, low=0.01):
        return (mask > low) & (mask < 1 - low)

    torch.manual_seed(0)
    reached = torch.zeros(gate.num_units, dtype=torch.bool)
    rows = neurons.raw_weight(gate.sources[0])
    for _ in range(20):
        rows.grad = None
        mask = gate.unit_soft_mask(sample=True)
        mask.sum().backward()
        per_unit = rows.grad.abs().sum(dim=1)
        inner, outer = banded(mask.detach(), 0.1), ~banded(mask.detach(), 0.001)
        assert per_unit[inner].min() > 10 * per_unit[outer].max()  # the band is where the gradient is
        reached |= banded(mask.detach())
    assert int(reached.sum()) > 20 * max(int(banded(quiet).sum()), 1)  # measured: 314 units of 576 against 3
    ones = torch.ones(3, gate.num_units)
    model.train()  # a fresh draw at every training forward
    assert not torch.equal(gate(ones), gate(ones))
    model.eval()  # the hard mask, the same at every call
    torch.testing.assert_close(gate(ones), gate(ones))
    assert torch.equal(gate(ones)[0].bool(), gate.unit_hard_mask())
    assert GateConfig(unit_noise=-0.1).problems() == ["gates.unit_noise: must be >= 0 (got -0.1); 0 turns the "
                                                      "noise off"]


def test_soft_sparsity_counts_the_parameters_each_unit_carries():
    model, _ = load_model("tiny", **NO_RANDOMNESS)
    found = gates.attach_gates(model, GateConfig(granularity="neuron", neuron_units=["ffn", "heads"],
                                                 threshold_init=0.9))
    hidden, head_dim = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    ffn, heads = [g for g in found.values() if g.kind == "ffn"], [g for g in found.values() if g.kind == "heads"]
    assert ffn[0].unit_params == hidden + 1 + hidden  # intermediate row + bias, output column
    assert heads[0].unit_params == 3 * head_dim * (hidden + 1) + head_dim * hidden  # q/k/v rows + biases, out cols
    model.train()
    model(audio())
    expected = 1 - sum(g.unit_soft_mask().sum() * g.unit_params for g in found.values()) / sum(
        g.numel for g in found.values())
    torch.testing.assert_close(gates.soft_sparsity(model), expected)


@pytest.mark.parametrize("arch", list(UNITS))
def test_exported_model_is_smaller_and_equals_the_hard_masked_model(arch, tmp_path):
    model, processor, _ = neuron_model(arch)
    before, after = gates.calibrate_thresholds(model, 0.5)
    assert abs(after - 0.5) <= 0.01, (before, after)  # parameter reduction of the gated units, +-1 pt
    model.eval()
    x = audio(seed=3)
    with torch.no_grad():
        hard_logits = model(x).logits
    counts_gated = count_parameters(model)
    plain = export.pruned_copy(model)
    assert not gates.gated_modules(plain) and not any("threshold" in n for n, _ in plain.named_parameters())
    # physically smaller: fewer parameters, none of them zeroed
    assert sum(p.numel() for p in plain.parameters()) == counts_gated.nonzero
    assert count_parameters(plain).total == counts_gated.total
    assert count_parameters(plain).nonzero == counts_gated.nonzero
    shapes = pruned_modeling.layer_shapes(plain)
    assert sum(shapes["intermediate_size"]) < model.config.num_hidden_layers * model.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, hard_logits, atol=1e-4, rtol=0)

    export.export_model(plain, processor, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[pruned_modeling.PRUNED_KEY].items() >= shapes.items()
    assert (tmp_path / pruned_modeling.MODULE_FILE).is_file()
    # stock transformers, through the loader shipped in the directory
    stock = AutoModelForCTC.from_pretrained(tmp_path, trust_remote_code=True).eval()
    reloaded, _ = load_model(str(tmp_path))  # pinch_ray: the same loader, no remote code
    for loaded in (stock, reloaded.eval()):
        assert pruned_modeling.layer_shapes(loaded) == shapes
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, hard_logits, atol=1e-4, rtol=0)
    # in a fresh interpreter: the shipped loader needs torch + transformers, never pinch_ray
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "logits.npy", hard_logits.numpy())
    code = ("import sys, numpy as np, torch\n"
            "from transformers import AutoModelForCTC\n"
            "model = AutoModelForCTC.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
            "with torch.no_grad():\n"
            "    logits = model(torch.from_numpy(np.load(sys.argv[2]))).logits.numpy()\n"
            "assert 'pinch_ray' not in sys.modules, sorted(m for m in sys.modules if 'pinch' in m)\n"
            "print(float(np.abs(logits - np.load(sys.argv[3])).max()))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "x.npy"),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-4
    (tmp_path / "x.npy").unlink()
    (tmp_path / "logits.npy").unlink()
    compact = tmp_path / "compact"
    export.save_compact(tmp_path, compact)
    assert pruned_modeling.layer_shapes(export.load_compact(compact)) == shapes
    unpacked = compact_format.unpack(compact, tmp_path / "unpacked")  # the store carries the loader too
    assert (unpacked / pruned_modeling.MODULE_FILE).read_bytes() == (tmp_path / pruned_modeling.MODULE_FILE).read_bytes()
    assert pruned_modeling.layer_shapes(AutoModelForCTC.from_pretrained(unpacked, trust_remote_code=True)) == shapes


@pytest.mark.slow
def test_sspg_neuron_training_reaches_the_target_with_mixed_layers():
    run = compressor("sspg-neuron", 0.5, steps=300)
    assert run.gate_cfg.granularity == "weight"  # the method, not the config, picks the granularity
    for batch in random_batches(300):
        run.step([batch])
    achieved = run.on_basis(gates.achieved_sparsity(run.model))  # hard masks, no calibration; of all parameters
    assert abs(achieved - 0.5) <= 0.01, achieved
    per_layer = [layer.sparsity for layer in gates.layer_sparsity(run.model)]
    assert max(per_layer) - min(per_layer) > 0.05, per_layer
    assert all(isinstance(g, neurons.UnitGate) for g in gates.gates_of(run.model))


def test_calibration_closes_the_gap_a_whole_head_leaves():
    model, _, found = neuron_model(threshold=0.9)
    for i, gate in enumerate(found.values()):
        gate.threshold.data.fill_(0.7 + 0.05 * i)
    for target in (0.3, 0.45, 0.6):
        _, after = gates.calibrate_thresholds(model, target)
        assert abs(after - target) <= 0.002, (target, after)


def test_a_layer_keeps_at_least_one_unit():
    model, _, found = neuron_model(threshold=50.0)  # every score is far under the threshold
    assert all(int(g.unit_hard_mask().sum()) == 1 for g in found.values())
    for gate in found.values():  # the soft mask keeps that unit whole too: the sparsity term counts what goes
        soft, hard = gate.unit_soft_mask().detach(), gate.unit_hard_mask()
        assert soft[hard].tolist() == [1.0] and float(soft[~hard].max()) < 1e-3
    plain = export.pruned_copy(model)
    assert pruned_modeling.layer_shapes(plain) == {"intermediate_size": [1, 1, 1], "num_attention_heads": [1, 1, 1]}
    with torch.no_grad():
        assert torch.isfinite(plain(audio()).logits).all()


def test_auto_units_take_what_the_model_supports_and_listed_units_must_fit():
    wavlm, _ = load_model("tiny-wavlm")
    found = gates.attach_gates(wavlm, GateConfig(granularity="neuron"))  # [auto]: ffn + conv, no heads
    assert sorted({g.kind for g in found.values()}) == ["conv", "ffn"]
    layer_norm_convs, _ = load_model("tiny", feat_extract_norm="layer")
    found = gates.attach_gates(layer_norm_convs, GateConfig(granularity="neuron"))
    assert sorted({g.kind for g in found.values()}) == ["ffn", "heads"]

    with pytest.raises(ConfigError) as err:
        gates.attach_gates(load_model("tiny-wavlm")[0], GateConfig(granularity="neuron", neuron_units=["ffn", "heads"]))
    assert "gates.neuron_units: heads: WavLMAttention" in str(err.value) and "remove heads" in str(err.value)
    with pytest.raises(ConfigError, match=r"gates.neuron_units: conv: .*normalises across channels.*remove conv"):
        gates.attach_gates(load_model("tiny", feat_extract_norm="layer")[0],
                           GateConfig(granularity="neuron", neuron_units=["ffn", "conv"]))


def test_bad_neuron_settings_are_named():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="gates.granularity: neuron needs transformer layers"):
        gates.attach_gates(NoLayers(), GateConfig(granularity="neuron"))
    problems = GateConfig(granularity="block", neuron_units=["ffn", "rows"]).problems()
    assert any(p.startswith("gates.granularity: 'block'") for p in problems)
    assert any(p.startswith("gates.neuron_units:") for p in problems)
    assert not GateConfig(granularity="neuron").problems()
