"""Whether a pipeline's local paths can be used: checked before a run starts, nothing created."""

from __future__ import annotations

import os

from pinch_ray.config.schema import PipelineConfig
from pinch_ray.storage import local_path


def check_paths(cfg: PipelineConfig) -> list[str]:
    """Problems a run of ``cfg`` would hit on disk before starting; nothing is created.

    ``sweep.dense_from`` must be the output directory of a run (its ``pipeline.yaml``). A local
    ``corpus.root`` must be a directory, unless the synthetic corpus is to be generated
    there (``corpus.synth_utterances`` > 0), when it must be creatable. ``output_dir`` and
    ``data.cache_dir`` must be writable directories or creatable: their nearest existing ancestor
    is a writable directory. Object-store URIs are not checked.
    """
    out = []
    root = local_path(cfg.corpus.root)
    if root and not os.path.isdir(root):
        if os.path.exists(root):
            out.append(f"corpus.root: {root} is a file, not a corpus directory")
        elif not cfg.corpus.synth_utterances:
            out.append(f"corpus.root: directory {root} does not exist; point it at the corpus "
                       "(corpus.root=/path/to/LibriSpeech), or set corpus.synth_utterances to generate "
                       "the synthetic corpus there")
        else:
            out += _writable_problems("corpus.root", root)
    if cfg.sweep.dense_from:
        source = local_path(cfg.sweep.dense_from)
        if source is None or not os.path.isfile(os.path.join(source, "pipeline.yaml")):
            out.append(f"sweep.dense_from: {cfg.sweep.dense_from} is not the local output_dir of a pinch-ray run "
                       "(no pipeline.yaml in it); name the output_dir of the run whose dense references to "
                       "reuse, or remove sweep.dense_from to train them here")
    for key, path in (("output_dir", cfg.output_dir), ("data.cache_dir", cfg.data.cache_dir),
                      ("storage_path", cfg.storage_path)):
        local = local_path(path)
        if local:
            out += _writable_problems(key, local)
    return out


def _writable_problems(key: str, path: str) -> list[str]:
    """Whether directory ``path`` is writable or creatable (nothing is created)."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)  # nearest existing ancestor
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        return [f"{key}: {path} {where}, not a directory; choose another path"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key}: {path} cannot be written ({existing} is not writable); choose another path"]
    return []
