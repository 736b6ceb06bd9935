"""Hard prune + export (stock transformers loads it), compact storage, atomic directories."""

import gzip
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pinch_ray.core import export, gates
from pinch_ray.config import GateConfig
from pinch_ray.core.models import count_parameters, load_model

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     feat_proj_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0)

# Runs in a fresh interpreter with stock transformers only; prints the max |logit difference|.
STOCK_LOADER = """
import sys
import numpy as np, torch
from transformers import AutoModelForCTC, AutoProcessor
model = AutoModelForCTC.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
assert type(processor).__name__ == "Wav2Vec2Processor", type(processor)
assert processor.tokenizer.word_delimiter_token == "|" and processor.tokenizer.pad_token == "<pad>"
with torch.no_grad():
    logits = model(torch.from_numpy(np.load(sys.argv[2]))).logits.numpy()
assert "pinch_ray" not in sys.modules, "the stock loader imported pinch_ray"
print(float(np.abs(logits - np.load(sys.argv[3])).max()))
"""


def audio(batch=2, seconds=1.0, seed=0):
    return torch.randn(batch, int(seconds * 16_000), generator=torch.Generator().manual_seed(seed))


def pruned_model(method, arch="tiny", target_sparsity=0.65, **gate_settings):
    """A tiny model with sspg gates (threshold 0.8 ~ 55% pruned) or ump masks, in eval mode."""
    model, processor = load_model(arch, **NO_RANDOMNESS)
    if method == "sspg":
        gates.attach_gates(model, GateConfig(threshold_init=0.8, **gate_settings))
    else:
        gates.attach_uniform_masks(model, GateConfig(**gate_settings), target_sparsity)
    return model.eval(), processor


@pytest.mark.parametrize("method, arch, gate_settings", [
    ("sspg", "tiny", {"gate_pos_conv": True, "gate_feature_encoder": True}),  # weight-norm conv folded too
    ("ump", "tiny-hubert", {}),
])
def test_stock_transformers_loads_the_export_with_hard_masked_logits(tmp_path, method, arch, gate_settings):
    model, processor = pruned_model(method, arch, **gate_settings)
    inputs = audio()
    with torch.no_grad():
        hard_masked_logits = model(inputs).logits  # eval(): hard masks
    layers_before = gates.layer_sparsity(model)

    plain = export.pruned_copy(model)
    export.export_model(plain, processor, tmp_path / "model")
    assert {"config.json", "model.safetensors", "vocab.json"} <= set(os.listdir(tmp_path / "model"))
    assert gates.layer_sparsity(model) == layers_before  # the gated model is untouched
    assert count_parameters(plain).nonzero == count_parameters(model).nonzero

    np.save(tmp_path / "inputs.npy", inputs.numpy())
    np.save(tmp_path / "logits.npy", hard_masked_logits.numpy())
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", STOCK_LOADER, str(tmp_path / "model"),
                             str(tmp_path / "inputs.npy"), str(tmp_path / "logits.npy")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5


def test_export_refuses_a_gated_model(tmp_path):
    model, processor = pruned_model("ump")
    with pytest.raises(ValueError, match="still carries gates"):
        export.export_model(model, processor, tmp_path / "model")


def test_compact_round_trip_restores_weights_at_a_fifth_of_the_size(tmp_path):
    model, processor = pruned_model("ump", target_sparsity=0.65)  # default patterns, 65% of gated weights
    plain = export.pruned_copy(model)
    export.export_model(plain, processor, tmp_path / "model")
    manifest = export.save_compact(tmp_path / "model", tmp_path / "compact")
    ratio = export.dir_bytes(tmp_path / "compact") / (tmp_path / "model" / "model.safetensors").stat().st_size
    assert ratio <= 0.21, ratio
    encodings = {entry["encoding"] for entry in manifest["tensors"]}
    assert encodings == {"bitmask_fp16", "fp16"}

    restored = export.load_compact(tmp_path / "compact")
    assert type(restored) is type(plain)
    exported = load_file(tmp_path / "model" / "model.safetensors")
    state = restored.state_dict()
    assert set(state) == set(exported)
    for name, weight in exported.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name] == 0, weight == 0), name  # the same pruned entries
        torch.testing.assert_close(state[name], weight, rtol=1e-3, atol=1e-6)  # fp16 rounding only
    with torch.no_grad():
        expected, got = plain(audio()).logits, restored(audio()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))  # same greedy decoding, hence same WER


def test_compact_directories_of_format_1_still_load(tmp_path):
    """Format 1 is the same layout, xz-compressed: trials finalized before gzip keep loading."""
    model, processor = pruned_model("ump", target_sparsity=0.65)
    export.export_model(export.pruned_copy(model), processor, tmp_path / "model")
    manifest = export.save_compact(tmp_path / "model", tmp_path / "v2")
    old = tmp_path / "v1"
    old.mkdir()
    payload = gzip.decompress((tmp_path / "v2" / export.COMPACT_WEIGHTS).read_bytes())
    (old / "weights.safetensors.xz").write_bytes(lzma.compress(payload))
    (old / export.COMPACT_MANIFEST).write_text(json.dumps({**manifest, "format_version": 1,
                                                           "weights": "weights.safetensors.xz"}))
    for a, b in zip(export.load_compact(old).state_dict().values(),
                    export.load_compact(tmp_path / "v2").state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_compact_rejects_an_unknown_format(tmp_path):
    (tmp_path / export.COMPACT_MANIFEST).write_text(json.dumps({"format": "pinch_ray.compact", "format_version": 99}))
    with pytest.raises(ValueError, match="format version"):
        export.load_compact(tmp_path)


def test_model_bytes_round_trip_handles_weight_norm():
    model, _ = load_model("tiny", **NO_RANDOMNESS)
    restored = export.model_from_bytes(export.model_to_bytes(model.eval()))
    with torch.no_grad():
        torch.testing.assert_close(restored(audio()).logits, model(audio()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/b", "/abs", "a..b", "sspg 0.65", "x.tmp-1"])
def test_trial_names_cannot_escape_output_dir(tmp_path, name):
    with pytest.raises(ValueError, match="trial name"):
        export.trial_dir(tmp_path, name)


def test_trial_dir_accepts_plain_names(tmp_path):
    assert export.trial_dir(tmp_path, "sspg-0.65") == (tmp_path / "sspg-0.65").resolve()
    assert export.trial_dir(tmp_path, "dense").parent == tmp_path.resolve()
