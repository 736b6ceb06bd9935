"""Hard prune and export: a plain HF model directory and a compact sparse copy.

``model/`` — :func:`export_model` folds the hard masks into the weights (``gates.fold``) and writes
the same HF class with ``save_pretrained`` (safetensors) next to the processor, so stock
transformers loads it without pinch_ray::

    AutoModelForCTC.from_pretrained("out/sspg-0.65/model")
    AutoProcessor.from_pretrained("out/sspg-0.65/model")

``compact/`` — :func:`save_compact` stores every floating-point tensor of that model in fp16; a
tensor with more than :data:`SPARSE_MIN_ZEROS` zeros is stored as a packed bitmask of its nonzero
positions (``numpy.packbits``, 1 bit per entry) plus its nonzero values. The tensors form one
safetensors file, gzip-compressed at level 1 (stdlib ``gzip``; ``gzip -d`` gives back a plain
safetensors file): ``weights.safetensors.gz`` + ``manifest.json`` (format version, per-tensor name /
shape / dtype / encoding, the HF config). :func:`load_compact` rebuilds the float32 model with no
pickle, and still reads format 1 (the same, xz-compressed). Size at 65% of the gated weights: 1 bit +
0.35 x 2 bytes per gated weight (0.206x fp32) plus 2 bytes per ungated one; deflate then removes
~13% (fp16 exponents are far from uniform). Level 1: the codecs differ in time far more than in
size (README, "The paper's setups on GPUs": finalize at full size).
"""

from __future__ import annotations

import copy
import json
import logging
import gzip
import lzma
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes
from safetensors.torch import load as load_safetensors_torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCTC, PreTrainedModel

from pinch_ray import storage
from pinch_ray.core import gates, pruned_modeling

log = logging.getLogger(__name__)

COMPACT_FORMAT_VERSION = 2  # 1: the same layout, xz-compressed (weights.safetensors.xz); still read
COMPACT_WEIGHTS = "weights.safetensors.gz"
COMPACT_MANIFEST = "manifest.json"
SPARSE_MIN_ZEROS = 0.3  # a tensor with more than this fraction of zeros is stored bitmask + nonzeros
GZIP_LEVEL = 1  # deflate level (1-9): ~40 MB/s on one core; 6 is 2x slower for 1% less
FP16_MAX = 65504.0  # largest finite fp16; a tensor beyond it is kept at its own precision
TRIAL_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


# ----------------------------------------------------------------------------------------------
# Trial directories
# ----------------------------------------------------------------------------------------------


def trial_dir(output_dir: str | os.PathLike, trial: str) -> Path:
    """``<output_dir>/<trial>``, after checking that ``trial`` is a plain name inside ``output_dir``.

    Raises:
        ValueError: ``trial`` is not ``[A-Za-z0-9._-]+``, is ``.``/``..``-like, or escapes ``output_dir``.
    """
    if not TRIAL_NAME.fullmatch(trial) or ".." in trial or trial.strip(".") == "" or storage.TMP_TAG in trial:
        raise ValueError(f"trial name {trial!r}: use letters, digits, '.', '_' and '-' only "
                         "(no '..', no path separators), e.g. sspg-0.65")
    root = Path(output_dir).resolve()
    path = (root / trial).resolve()
    if path.parent != root:
        raise ValueError(f"trial name {trial!r} resolves to {path}, outside output_dir {root}")
    return path


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# Hard prune + HF export
# ----------------------------------------------------------------------------------------------


def pruned_copy(model: nn.Module) -> PreTrainedModel:
    """A plain HF model (same class, no gates) with the hard masks applied; ``model`` is untouched.

    Accepts a DDP-wrapped model. The copy is in ``eval()`` mode, float32, on the CPU.
    """
    model = getattr(model, "module", model)
    for gate in gates.gates_of(model):  # a soft forward's mask sum (part of an autograd graph): transient
        gate.last_mask_sum = None
    replica = copy.deepcopy(model)
    # torch's deepcopy of a parametrized module shares its generated class ("ParametrizedLinear")
    # with the original, and removing the parametrization edits that class: give the replica its own.
    for module in replica.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return gates.fold(replica).cpu().float().eval()


def export_model(plain: PreTrainedModel, processor, directory: str | os.PathLike) -> None:
    """``save_pretrained`` the plain model (safetensors) and the processor into ``directory``.

    Raises:
        ValueError: the model still carries gates (pass it through :func:`pruned_copy` first).
    """
    if gates.gated_modules(plain):
        raise ValueError("export_model: the model still carries gates; export pruned_copy(model)")
    plain.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    if getattr(plain.config, pruned_modeling.PRUNED_KEY, None):  # smaller layers: ship their loader
        shutil.copyfile(pruned_modeling.__file__, Path(directory) / pruned_modeling.MODULE_FILE)


def model_to_bytes(plain: PreTrainedModel) -> dict:
    """A plain model as ``{"config": dict, "weights": safetensors bytes}``, to ship to Ray actors.

    (Parametrized modules, e.g. wav2vec2's weight-normalised positional conv, cannot be pickled.)
    """
    state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
    return {"config": plain.config.to_dict(), "weights": save_safetensors_torch(state)}


def model_from_bytes(packed: dict) -> PreTrainedModel:
    """Inverse of :func:`model_to_bytes`: the float32 model, eval mode, CPU."""
    return _model_from_state(packed["config"], load_safetensors_torch(packed["weights"]))


def _model_from_state(config: dict, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    hf_config = AutoConfig.for_model(**config)
    if config.get(pruned_modeling.PRUNED_KEY):
        model = pruned_modeling.loader_class(hf_config.model_type)(hf_config)
    else:
        model = AutoModelForCTC.from_config(hf_config)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


# ----------------------------------------------------------------------------------------------
# Compact sparse storage
# ----------------------------------------------------------------------------------------------


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


def _decode(entry: dict, stored: dict[str, np.ndarray]) -> torch.Tensor:
    name, shape, dtype = entry["name"], tuple(entry["shape"]), np.dtype(entry["dtype"])
    if entry["encoding"] == "bitmask_fp16":
        size = int(np.prod(shape))
        nonzero = np.unpackbits(stored[f"{name}.mask"], count=size).astype(bool)
        flat = np.zeros(size, dtype=dtype)
        flat[nonzero] = stored[f"{name}.values"]
        return torch.from_numpy(flat.reshape(shape))
    if entry["encoding"] in ("fp16", "raw"):
        return torch.from_numpy(stored[name].astype(dtype).reshape(shape))
    raise ValueError(f"compact manifest: unknown encoding {entry['encoding']!r} of {name}")


def save_compact(model_dir: str | os.PathLike, directory: str | os.PathLike) -> dict:
    """Write the compact form of an exported ``model/`` directory into ``directory``.

    Reads ``<model_dir>/model.safetensors`` and ``config.json`` (so the compact copy matches the
    export exactly). Returns the manifest.
    """
    model_dir, directory = Path(model_dir), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = load_file(model_dir / "model.safetensors")
    stored: dict[str, np.ndarray] = {}
    entries = [_encode(name, tensor.numpy(), stored) for name, tensor in tensors.items()]
    (directory / COMPACT_WEIGHTS).write_bytes(gzip.compress(save_safetensors_bytes(stored), compresslevel=GZIP_LEVEL,
                                                            mtime=0))
    manifest = {"format": "pinch_ray.compact", "format_version": COMPACT_FORMAT_VERSION,
                "weights": COMPACT_WEIGHTS, "sparse_min_zeros": SPARSE_MIN_ZEROS, "tensors": entries,
                "config": json.loads((model_dir / "config.json").read_text())}
    (directory / COMPACT_MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")))
    return manifest


_DECOMPRESS = {1: lzma.decompress, COMPACT_FORMAT_VERSION: gzip.decompress}  # format version -> codec


def load_compact(directory: str | os.PathLike) -> PreTrainedModel:
    """Rebuild the plain float32 HF model stored by :func:`save_compact` (eval mode, CPU).

    Raises:
        ValueError: not a compact directory, or a format version this code cannot read.
    """
    directory = Path(directory)
    manifest = json.loads((directory / COMPACT_MANIFEST).read_text())
    version = manifest.get("format_version")
    if manifest.get("format") != "pinch_ray.compact" or version not in _DECOMPRESS:
        raise ValueError(f"{directory}: not a pinch_ray compact directory of format version "
                         f"{' or '.join(map(str, _DECOMPRESS))} (manifest says {version!r})")
    stored = load_safetensors_bytes(_DECOMPRESS[version]((directory / manifest["weights"]).read_bytes()))
    return _model_from_state(manifest["config"], {entry["name"]: _decode(entry, stored)
                                                  for entry in manifest["tensors"]})
