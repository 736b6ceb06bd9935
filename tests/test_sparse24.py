"""2:4 semi-structured export: the pattern, measured extra pruning, the CLI, a clear skip on CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCTC

from pinch_ray.core import export, sparse24
from pinch_ray.cli import EXIT_BAD_INPUT, EXIT_OK, main
from pinch_ray.config import DEFAULT_GATE_PATTERNS
from pinch_ray.core.models import load_model


def test_mask_keeps_the_two_largest_of_every_four():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 0.0, 0.0, 0.0, 7.0],
                           [1.0, 1.5, -0.2, -4.0, 0.3, 0.2, 0.1, 0.4]])
    mask = sparse24.mask_2to4(weight)
    assert mask.tolist()[0][:4] == [False, True, True, False]
    assert mask.tolist()[1][:4] == [False, True, False, True]
    assert mask.tolist()[1][4:] == [True, False, False, True]
    assert (mask.reshape(2, 2, 4).sum(-1) == 2).all()
    assert sparse24.is_2to4(weight * mask) and not sparse24.is_2to4(weight)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24.mask_2to4(torch.ones(2, 6))


def test_prune_2to4_reports_before_and_after_and_keeps_zeros():
    model, _ = load_model("tiny")
    layers = sparse24.selected_linears(model, DEFAULT_GATE_PATTERNS)
    first = next(iter(layers.values()))
    with torch.no_grad():
        first.weight[:, :8] = 0.0  # already pruned entries stay pruned
    report = sparse24.prune_2to4(model, DEFAULT_GATE_PATTERNS)
    assert [r["layer"] for r in report] == list(layers)
    assert all(sparse24.is_2to4(m.weight) for m in layers.values())
    assert report[0]["sparsity_before"] == pytest.approx(8 / first.in_features)
    assert all(r["sparsity_after"] >= 0.5 for r in report)
    assert [r["sparsity_after"] for r in report[1:]] == [0.5] * (len(report) - 1)
    # an input size 2:4 cannot tile (a neuron-pruned output_dense) is left dense and reported
    odd = torch.nn.Sequential()
    odd.add_module("encoder", torch.nn.Module())
    odd.encoder.add_module("layers", torch.nn.ModuleList([torch.nn.Module()]))
    odd.encoder.layers[0].add_module("feed_forward", torch.nn.Module())
    odd.encoder.layers[0].feed_forward.output_dense = torch.nn.Linear(6, 4)
    (entry,) = sparse24.prune_2to4(odd, DEFAULT_GATE_PATTERNS)
    assert entry["skipped"].startswith("6 inputs") and entry["sparsity_after"] == entry["sparsity_before"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message; GPUs run benchmarks/gpu_check.sh")
def test_kernels_are_skipped_on_cpu_with_a_clear_message():
    model, _ = load_model("tiny")
    sparse24.prune_2to4(model, DEFAULT_GATE_PATTERNS)
    with pytest.raises(sparse24.Semi24Unavailable, match="CUDA GPUs only.*skipped"):
        sparse24.to_semi_structured(model, DEFAULT_GATE_PATTERNS)


def test_export_2to4_command(tmp_path, capsys):
    model, processor = load_model("tiny")
    export.export_model(model.eval(), processor, tmp_path / "model")
    out = tmp_path / "model-2to4"
    assert main(["export-2to4", str(tmp_path / "model"), str(out)]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["sparsity_after"] == pytest.approx(0.5) and printed["layers"] == 19
    report = json.loads((out / "sparsity_2to4.json").read_text())
    assert report["sparsity_before"] == 0.0 and len(report["layers"]) == 19
    reloaded = AutoModelForCTC.from_pretrained(out)  # a stock HF directory
    assert all(sparse24.is_2to4(m.weight) for m in sparse24.selected_linears(reloaded, DEFAULT_GATE_PATTERNS).values())
    # an existing, non-empty output directory is refused and left alone
    assert main(["export-2to4", str(tmp_path / "model"), str(out)]) == EXIT_BAD_INPUT
    assert main(["export-2to4", str(tmp_path / "nothing"), str(tmp_path / "x")]) == EXIT_BAD_INPUT
    assert not (tmp_path / "x").exists()
