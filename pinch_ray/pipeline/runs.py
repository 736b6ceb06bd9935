"""The run directory: what one Ray Train run (a trial, or the dense baseline) leaves in the run
storage, and the only module that writes, finds or reads it.

    <run storage>/<run name>/           run storage: storage_path, or <output_dir>/runs
      step-0000250/state.pt             every checkpoint: Compressor.state_dict() + data progress
                   settings.json        every checkpoint: the settings the run trains with
      step-0001000/state.pt             the final checkpoint, also:
                   model/               the folded HF model + processor (save_pretrained)
                   train_result.json    what the run achieved, and the settings it ran with

The run storage may be a local directory or an object-store URI (:mod:`pinch_ray.storage`). A run
is finished when a checkpoint holds both ``model/`` and ``train_result.json``; its final checkpoint
directory ("result dir") is what the pipeline passes around.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import torch
from torch import nn

from pinch_ray import storage
from pinch_ray.core.export import export_model, pruned_copy

CHECKPOINT_STATE = "state.pt"  # Compressor.state_dict() + data progress (torch.save, tensors only)
CHECKPOINT_MODEL = "model"  # final checkpoint only: the folded HF model + processor
TRAIN_RESULT = "train_result.json"  # final checkpoint only: what the run achieved
CHECKPOINT_SETTINGS = "settings.json"  # every checkpoint: the run's settings (what a resume must match)


def checkpoint_name(step: int) -> str:
    """A checkpoint's directory name, ``step-0000250``: names sort in step order."""
    return f"step-{step:07d}"


def save_checkpoint(directory: str | os.PathLike, compressor_state: dict, progress: dict,
                    settings: dict | None = None) -> None:
    """Write a checkpoint's state into ``directory`` (Ray Train then uploads it), with the run's
    ``settings`` (``sweep.run_settings``), so that a rerun with other settings does not resume it."""
    torch.save({"compressor": compressor_state, "progress": dict(progress)}, Path(directory) / CHECKPOINT_STATE)
    if settings is not None:
        (Path(directory) / CHECKPOINT_SETTINGS).write_text(json.dumps(settings, indent=1, sort_keys=True))


def save_final(directory: str | os.PathLike, model: nn.Module, processor, result: dict) -> None:
    """Add what makes ``directory`` a final checkpoint: the hard-pruned ``model`` (gated or plain,
    left untouched) with its processor, then ``result`` (JSON-able; floats of any kind) as
    ``train_result.json``."""
    directory = Path(directory)
    export_model(pruned_copy(model), processor, directory / CHECKPOINT_MODEL)
    (directory / TRAIN_RESULT).write_text(json.dumps(result, indent=2, default=float))


def load_checkpoint_state(directory: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint's saved state (``compressor`` state dict and data ``progress``), tensors only."""
    return torch.load(Path(directory) / CHECKPOINT_STATE, map_location=map_location, weights_only=True)


def run_dir(run_storage: str | os.PathLike, name: str) -> str:
    """The directory of run ``name`` (a local path or a URI like ``run_storage``)."""
    return storage.join(run_storage, name)


def _run_subdirs(run_storage: str | os.PathLike, name: str):
    """``(directory, filesystem, [FileInfo of each directory in it])`` of run ``name``."""
    import pyarrow.fs as pafs

    directory = run_dir(run_storage, name)
    fs, base = storage.filesystem(directory)
    children = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return directory, fs, [child for child in children if child.type == pafs.FileType.Directory]


def final_result_dir(run_storage: str | os.PathLike, name: str) -> str | None:
    """The final checkpoint directory of run ``name``, a local path or a URI like ``run_storage``;
    None when the run has not finished (or never started)."""
    import pyarrow.fs as pafs

    directory, fs, children = _run_subdirs(run_storage, name)
    finished = []
    for child in children:
        result, model = fs.get_file_info([posixpath.join(child.path, TRAIN_RESULT),
                                          posixpath.join(child.path, CHECKPOINT_MODEL)])
        if result.type == pafs.FileType.File and model.type == pafs.FileType.Directory:
            finished.append(child.base_name)
    return storage.join(directory, max(finished)) if finished else None  # checkpoint_name sorts by step


def latest_checkpoint(run_storage: str | os.PathLike, name: str) -> str | None:
    """The checkpoint directory of run ``name`` with the highest step (finished or not), a local path
    or a URI like ``run_storage``; None when the run has none."""
    directory, _, children = _run_subdirs(run_storage, name)
    steps = [child.base_name for child in children if child.base_name.startswith("step-")]
    return storage.join(directory, max(steps)) if steps else None


def read_checkpoint_settings(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The settings a checkpoint was trained with; None for one written before checkpoints recorded them."""
    path = storage.join(checkpoint_dir, CHECKPOINT_SETTINGS)
    return json.loads(storage.read_text(path)) if storage.is_file(path) else None


def read_train_result(result_dir: str | os.PathLike) -> dict:
    """The ``train_result.json`` of a final checkpoint directory (a local path or a URI)."""
    return json.loads(storage.read_text(storage.join(result_dir, TRAIN_RESULT)))


def model_dir(result_dir: str | os.PathLike) -> str:
    """The folded model of a final checkpoint directory: where a run that continues it starts."""
    return storage.join(result_dir, CHECKPOINT_MODEL)


def result_dir_of(model: str | os.PathLike) -> str | None:
    """The final checkpoint directory whose :func:`model_dir` ``model`` is, if it is one of ours
    (``train_result.json`` beside it); None for any other model (a hub id, a preset, a directory)."""
    model = os.fspath(model).rstrip("/")
    if posixpath.basename(model.split("?")[0]) != CHECKPOINT_MODEL:
        return None
    upstream = storage.parent(model)
    return upstream if storage.is_file(storage.join(upstream, TRAIN_RESULT)) else None
