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
from safetensors.numpy import save_file
from safetensors.torch import load_file

from pinch_ray.core import compact_format, export, gates
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
    ("sspg", "tiny", {}),  # the conv layers gated too (the default): the weight-norm conv folded too
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


def _exported(tmp_path, target_sparsity=0.65):
    """A ump-pruned tiny model (default patterns) exported to ``tmp_path/model``; returns the plain model."""
    model, processor = pruned_model("ump", target_sparsity=target_sparsity)
    plain = export.pruned_copy(model)
    export.export_model(plain, processor, tmp_path / "model")
    return plain


def test_compact_round_trip_gives_the_fp16_rounded_export_at_a_fifth_of_the_size(tmp_path):
    plain = _exported(tmp_path)  # 65% of the gated weights
    manifest = export.save_compact(tmp_path / "model", tmp_path / "compact")
    fp32_bytes = (tmp_path / "model" / "model.safetensors").stat().st_size
    stored = sum((tmp_path / "compact" / name).stat().st_size for name in (compact_format.WEIGHTS, compact_format.MANIFEST))
    assert stored / fp32_bytes <= 0.21, stored / fp32_bytes
    extras = export.dir_bytes(tmp_path / "compact") - stored  # processor files and the unpacker: a fixed cost
    assert extras < 16_000, extras
    assert {entry["encoding"] for entry in manifest["tensors"]} == {"bitmask_fp16", "fp16"}

    restored = export.load_compact(tmp_path / "compact")
    assert type(restored) is type(plain)
    exported = load_file(tmp_path / "model" / "model.safetensors")
    state = restored.state_dict()
    assert set(state) == set(exported)
    for name, weight in exported.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], weight.half().float()), name
    with torch.no_grad():
        expected, got = plain(audio()).logits, restored(audio()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))  # same greedy decoding, hence same WER


def test_compact_keeps_what_fp16_cannot_hold_and_what_is_not_float(tmp_path):
    """Beyond fp16's range a tensor is stored at its own dtype; below it, tiny values round to zero
    exactly as ``.half()`` rounds them; integer tensors are stored as they are."""
    rng = np.random.default_rng(0)
    sparse = rng.normal(size=(64, 48)).astype(np.float32) * (rng.random((64, 48)) < 0.3)
    sparse[0, :4] = [1e-9, -3e-8, 6e-5, 7e-8]  # flushed to zero, kept as a subnormal, rounded...
    tensors = {"big": np.array([[1e5, -2.5, 0.0, 3e-3]], dtype=np.float32),  # > 65504: stays float32
               "sparse": sparse, "dense": rng.normal(size=(16, 8)).astype(np.float32),
               "steps": np.arange(6, dtype=np.int64).reshape(2, 3), "empty": np.zeros((0, 3), dtype=np.float32)}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file(tensors, model_dir / "model.safetensors")
    (model_dir / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    manifest = compact_format.pack(model_dir, tmp_path / "compact")
    assert {entry["name"]: entry["encoding"] for entry in manifest["tensors"]} == {
        "big": "raw", "sparse": "bitmask_fp16", "dense": "fp16", "steps": "raw", "empty": "fp16"}
    config, restored = compact_format.read_tensors(tmp_path / "compact")
    assert config == {"model_type": "wav2vec2"}
    for name, array in tensors.items():
        expected = array if name in ("big", "steps") else array.astype(np.float16).astype(array.dtype)
        assert restored[name].dtype == array.dtype and restored[name].shape == array.shape, name
        np.testing.assert_array_equal(restored[name], expected, err_msg=name)
    assert restored["sparse"][0, 0] == 0.0 and restored["sparse"][0, 2] != 0.0
    assert restored["big"][0, 0] == 1e5


# Runs the unpacker a compact directory carries, as a user would, and reports what it imported.
UNPACK = """
import runpy, sys
script, compact, model = sys.argv[1:]
sys.argv = [script, compact, model]
runpy.run_path(script, run_name="__main__")
print("imported:", sorted(m for m in ("pinch_ray", "torch", "transformers") if m in sys.modules))
"""


def test_a_compact_directory_unpacks_without_pinch_ray_into_what_stock_transformers_loads(tmp_path):
    _exported(tmp_path)
    export.save_compact(tmp_path / "model", tmp_path / "takehome" / "compact")
    compact = tmp_path / "takehome" / "compact"
    restored = export.load_compact(compact)
    inputs = audio()
    with torch.no_grad():
        expected = restored(inputs).logits
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    unpacked = tmp_path / "unpacked"
    result = subprocess.run([sys.executable, "-c", UNPACK, str(compact / compact_format.SCRIPT), str(compact),
                             str(unpacked)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "imported: []", result.stdout  # numpy and safetensors only
    assert not (tmp_path / "unpacked.unpacking").exists()
    assert sorted(os.listdir(unpacked)) == sorted(os.listdir(tmp_path / "model"))

    np.save(tmp_path / "inputs.npy", inputs.numpy())
    np.save(tmp_path / "logits.npy", expected.numpy())
    result = subprocess.run([sys.executable, "-c", STOCK_LOADER, str(unpacked), str(tmp_path / "inputs.npy"),
                             str(tmp_path / "logits.npy")], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5

    again = subprocess.run([sys.executable, str(compact / compact_format.SCRIPT), str(compact), str(unpacked)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not an empty directory" in again.stderr, again.stderr  # nothing overwritten
    broken = subprocess.run([sys.executable, str(compact / compact_format.SCRIPT), str(tmp_path), str(tmp_path / "x")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1 and "not a pinch_ray compact directory" in broken.stderr, broken.stderr


def test_compact_directories_of_format_1_still_load(tmp_path):
    """Format 1 is the same layout, xz-compressed: trials finalized before gzip keep loading."""
    _exported(tmp_path)
    manifest = export.save_compact(tmp_path / "model", tmp_path / "v2")
    old = tmp_path / "v1"
    old.mkdir()
    payload = gzip.decompress((tmp_path / "v2" / compact_format.WEIGHTS).read_bytes())
    (old / "weights.safetensors.xz").write_bytes(lzma.compress(payload))
    (old / compact_format.MANIFEST).write_text(json.dumps({**manifest, "format_version": 1,
                                                           "weights": "weights.safetensors.xz"}))
    for a, b in zip(export.load_compact(old).state_dict().values(),
                    export.load_compact(tmp_path / "v2").state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_compact_rejects_an_unknown_format(tmp_path):
    (tmp_path / compact_format.MANIFEST).write_text(json.dumps({"format": "pinch_ray.compact", "format_version": 99}))
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
