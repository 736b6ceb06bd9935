"""The compact store: a pruned model in a fifth of its fp32 bytes, unpacked with numpy + safetensors.

A model directory exported by pinch_ray (``model/``) is stored compactly as ``compact/``:

    weights.safetensors.gz   every tensor of model.safetensors: fp16, or for a tensor with more than
                             SPARSE_MIN_ZEROS zeros a packed bitmask of its nonzero positions
                             (numpy.packbits, 1 bit per entry) + its nonzero values in fp16; integer
                             tensors and tensors beyond fp16's range at their own dtype. One safetensors
                             file, gzip level 1 (``gzip -d`` gives a plain safetensors file)
    manifest.json            format and version, per tensor: name, shape, dtype, encoding; the config
    unpack_compact.py        this file
    *.json, *.py ...         the rest of the model directory (processor, tokenizer, model card, the
                             neuron-pruned loader): all but model.safetensors and config.json

It imports only the standard library, numpy and safetensors (both installed with transformers): the
export copies it into every ``compact/`` directory, so the store can be taken home and turned back into
a model directory that stock transformers loads, without pinch_ray::

    python compact/unpack_compact.py compact/ model/
    AutoModelForCTC.from_pretrained("model/")     # trust_remote_code=True for a neuron-pruned model

Size at 65% of the gated weights: 1 bit + 0.35 x 2 bytes per gated weight (0.206x fp32) plus 2 bytes
per ungated one; deflate then removes ~13% (fp16 exponents are far from uniform). Level 1: the codecs
differ in time far more than in size (docs/benchmarks.md: finalize at full size).

What comes back equals the export with its floating-point weights rounded to fp16 (a tensor beyond
fp16's range kept as it was).
pinch_ray's own loader (``pinch_ray.core.export.load_compact``) reads the same tensors through
:func:`read_tensors`.

Why not compressed-tensors' ``sparse-bitmask`` (the format vLLM read): the compressed-tensors releases
that transformers 5 accepts (>= 0.15) no longer carry the sparse compressors, and loading such a
checkpoint with them leaves every compressed matrix newly initialised, with a warning only (measured
2026-12-02: compressed-tensors 0.13.0 wrote it, 0.20.1 + transformers 5.24 loaded a wav2vec2-base with
74 random matrices). Its layout (values at the model's dtype, per-row offsets, no entropy coding) also
took 0.236x the fp32 bytes with fp16 values, where this one takes 0.205x (the same model).
"""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import load_file, save_file
from safetensors.numpy import save as save_safetensors_bytes

FORMAT = "pinch_ray.compact"
FORMAT_VERSION = 2  # 1: the same layout, xz-compressed (weights.safetensors.xz); still read
WEIGHTS = "weights.safetensors.gz"
MANIFEST = "manifest.json"
MODEL_WEIGHTS = "model.safetensors"  # the exported model's weights file, which the store replaces
SCRIPT = "unpack_compact.py"  # the name this file gets inside a compact directory
SPARSE_MIN_ZEROS = 0.3  # a tensor with more than this fraction of zeros is stored bitmask + nonzeros
GZIP_LEVEL = 1  # deflate level (1-9): ~40 MB/s on one core; 6 is 2x slower for 1% less
FP16_MAX = 65504.0  # largest finite fp16; a tensor beyond it is kept at its own precision
_DECOMPRESS = {1: lzma.decompress, FORMAT_VERSION: gzip.decompress}  # format version -> codec


def _encode(name: str, array: np.ndarray, out: dict[str, np.ndarray]) -> dict:
    """Add the stored form of one tensor to ``out``; returns its manifest entry."""
    entry = {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
    flat = array.reshape(-1)
    if not np.issubdtype(array.dtype, np.floating) or np.abs(flat).max(initial=0.0) > FP16_MAX:
        out[name] = np.ascontiguousarray(array)
        entry["encoding"] = "raw"
        return entry
    nonzero = flat != 0
    if flat.size and 1.0 - nonzero.mean() > SPARSE_MIN_ZEROS:
        out[f"{name}.mask"] = np.packbits(nonzero)
        out[f"{name}.values"] = flat[nonzero].astype(np.float16)
        entry["encoding"] = "bitmask_fp16"
    else:
        out[name] = array.astype(np.float16)
        entry["encoding"] = "fp16"
    return entry


def _decode(entry: dict, stored: dict[str, np.ndarray]) -> np.ndarray:
    name, shape, dtype = entry["name"], tuple(entry["shape"]), np.dtype(entry["dtype"])
    if entry["encoding"] == "bitmask_fp16":
        size = int(np.prod(shape))
        nonzero = np.unpackbits(stored[f"{name}.mask"], count=size).astype(bool)
        flat = np.zeros(size, dtype=dtype)
        flat[nonzero] = stored[f"{name}.values"]
        return flat.reshape(shape)
    if entry["encoding"] in ("fp16", "raw"):
        return stored[name].astype(dtype).reshape(shape)
    raise ValueError(f"compact manifest: unknown encoding {entry['encoding']!r} of {name}")


def pack(model_dir: str | Path, directory: str | Path) -> dict:
    """Write the compact form of the model directory ``model_dir`` into ``directory``; returns the manifest."""
    model_dir, directory = Path(model_dir), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored: dict[str, np.ndarray] = {}
    entries = [_encode(name, array, stored) for name, array in load_file(model_dir / MODEL_WEIGHTS).items()]
    payload = gzip.compress(save_safetensors_bytes(stored), compresslevel=GZIP_LEVEL, mtime=0)
    (directory / WEIGHTS).write_bytes(payload)
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in (MODEL_WEIGHTS, "config.json", WEIGHTS, MANIFEST, SCRIPT):
            shutil.copyfile(path, directory / path.name)  # the config goes into the manifest
    shutil.copyfile(__file__, directory / SCRIPT)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": WEIGHTS,
                "sparse_min_zeros": SPARSE_MIN_ZEROS, "tensors": entries,
                "config": json.loads((model_dir / "config.json").read_text())}
    (directory / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")))
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a compact directory.

    Raises:
        ValueError: not a compact directory, or a format version this code cannot read.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise ValueError(f"{directory}: no {MANIFEST}; not a pinch_ray compact directory")
    manifest = json.loads((directory / MANIFEST).read_text())
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT or version not in _DECOMPRESS:
        raise ValueError(f"{directory}: not a pinch_ray compact directory of format version "
                         f"{' or '.join(map(str, _DECOMPRESS))} (manifest says {version!r})")
    return manifest


def read_tensors(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a compact directory: the HF config dict and every weight, by name."""
    manifest = read_manifest(directory)
    codec = _DECOMPRESS[manifest["format_version"]]
    stored = load_safetensors_bytes(codec((Path(directory) / manifest["weights"]).read_bytes()))
    return manifest["config"], {entry["name"]: _decode(entry, stored) for entry in manifest["tensors"]}


def unpack(directory: str | Path, model_dir: str | Path) -> Path:
    """Write the model directory stored in the compact ``directory`` to ``model_dir``.

    ``model_dir`` appears whole or not at all (written beside it, then renamed into place).

    Raises:
        ValueError: ``directory`` is not a compact directory this code reads, or ``model_dir`` exists
            and is not empty.
    """
    directory, model_dir = Path(directory), Path(model_dir)
    if model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir())):
        raise ValueError(f"{model_dir} exists and is not an empty directory; name a new one")
    config, tensors = read_tensors(directory)
    partial = model_dir.with_name(f"{model_dir.name}.unpacking")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in (WEIGHTS, MANIFEST, SCRIPT):
            shutil.copyfile(path, partial / path.name)
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, partial / MODEL_WEIGHTS, metadata={"format": "pt"})
    if model_dir.exists():
        model_dir.rmdir()
    partial.rename(model_dir)
    return model_dir


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python {Path(sys.argv[0]).name} COMPACT_DIR MODEL_DIR\n"
                 "writes a model directory that transformers' from_pretrained loads")
    try:
        print(unpack(sys.argv[1], sys.argv[2]))
    except (OSError, ValueError) as error:
        sys.exit(f"unpack_compact: {error}")
