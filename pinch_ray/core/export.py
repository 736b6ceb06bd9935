"""Hard prune and export: a plain HF model directory and a compact sparse copy.

``model/`` — :func:`export_model` folds the hard masks into the weights (``gates.fold``) and writes
the same HF class with ``save_pretrained`` (safetensors) next to the processor, so stock
transformers loads it without pinch_ray::

    AutoModelForCTC.from_pretrained("out/sspg-0.65/model")
    AutoProcessor.from_pretrained("out/sspg-0.65/model")

``compact/`` — :func:`save_compact` stores that directory in about a fifth of its fp32 bytes (fp16,
and a bitmask + nonzero values for pruned tensors; gzip), with its own unpacker, which needs numpy and
safetensors only: ``python compact/unpack_compact.py compact/ model/`` gives back a directory stock
transformers loads. The format, and why it is not compressed-tensors': :mod:`pinch_ray.core.compact_format`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_torch
from safetensors.torch import save as save_safetensors_torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCTC, PreTrainedModel

from pinch_ray import storage
from pinch_ray.core import compact_format, gates, pruned_modeling

log = logging.getLogger(__name__)

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
    """``save_pretrained`` the plain model (safetensors) and the processor (None: none) into ``directory``.

    Raises:
        ValueError: the model still carries gates (pass it through :func:`pruned_copy` first).
    """
    if gates.gated_modules(plain):
        raise ValueError("export_model: the model still carries gates; export pruned_copy(model)")
    plain.save_pretrained(directory, safe_serialization=True)
    if processor is not None:
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
# Compact sparse storage (the format: compact_format, which the store carries as its own unpacker)
# ----------------------------------------------------------------------------------------------


def save_compact(model_dir: str | os.PathLike, directory: str | os.PathLike) -> dict:
    """Write the compact form of an exported ``model/`` directory into ``directory``.

    Reads ``<model_dir>/model.safetensors`` and the rest of the directory (so the compact copy
    matches the export exactly). Returns the manifest.
    """
    return compact_format.pack(model_dir, directory)


def load_compact(directory: str | os.PathLike) -> PreTrainedModel:
    """Rebuild the plain float32 HF model stored by :func:`save_compact` (eval mode, CPU).

    Raises:
        ValueError: not a compact directory, or a format version this code cannot read.
    """
    config, tensors = compact_format.read_tensors(directory)
    return _model_from_state(config, {name: torch.from_numpy(array) for name, array in tensors.items()})
