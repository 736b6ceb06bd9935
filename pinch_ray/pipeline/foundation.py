"""Ship a finished foundation run as a foundation that ``model.init_from`` names.

    pinch-ray run pipelines/foundation.yaml && pinch-ray foundation ship runs/foundation

:func:`ship` copies the run's trial ``foundation`` (its exported ``model/``, model card included)
to ``pinch_ray/foundations/<name>/`` with ``foundation.json`` beside it: the command that built
it, the training settings, the corpus definition (size, seed, the train split it learned from),
the code version, its WER/CER, and the fingerprint :func:`pinch_ray.core.models.checkpoint_path`
compares with the code on every load. The directory is written under a temporary name and renamed
into place: a failed ship leaves the shipped foundation as it was.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from pinch_ray import __version__, storage
from pinch_ray.config import FOUNDATION_TRIAL, load_pipeline
from pinch_ray.core import models
from pinch_ray.pipeline.report import METRICS_FILE
from pinch_ray.pipeline.stages import CONFIG_FILE


def _git(*args: str) -> str | None:
    """The output of ``git <args>`` in the checkout this package runs from, or None outside one."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _code_version() -> str:
    """``git describe`` of the checkout this package runs from (``-dirty``: uncommitted changes),
    or the package version outside a git checkout."""
    described = _git("describe", "--always", "--dirty", "--abbrev=12")
    return f"{__version__}+g{described}" if described else __version__


def _provenance() -> dict:
    """``rebuild_commit``: the commit whose checkout rebuilds what is shipped now, or None when the
    tracked files have uncommitted changes (``uncommitted`` lists them: commit them and ship again,
    or show in ``rebuild_commit_evidence`` that they change nothing a foundation depends on, as
    docs/architecture.md does for synth-tiny and synth-small)."""
    changed = _git("status", "--porcelain", "--untracked-files=no")
    if changed is None:
        return {"rebuild_commit": None}
    if changed:
        return {"rebuild_commit": None, "uncommitted": sorted(line[3:] for line in changed.splitlines())}
    return {"rebuild_commit": _git("rev-parse", "HEAD")}


def ship(output_dir: str | Path, name: str | None = None, dest_root: str | Path | None = None) -> Path:
    """Copy the foundation trial of the finished run at ``output_dir`` to ``<dest_root>/<name>``
    (default: :data:`pinch_ray.core.models.DEFAULT_FOUNDATION` in the package's ``foundations/``);
    returns that directory.

    Raises:
        FileNotFoundError: ``output_dir`` has no finished foundation trial (finalize not done).
        ValueError: the run is no foundation run (a preset from random weights on the synthetic corpus),
            or ``name`` is None for a run of another pipeline than ``pipelines/foundation.yaml``.
    """
    output_dir = str(output_dir)  # a directory, or the object-store URI the run wrote to
    config_path, trial = storage.join(output_dir, CONFIG_FILE), storage.join(output_dir, FOUNDATION_TRIAL)
    if not storage.is_file(config_path):
        raise FileNotFoundError(f"{output_dir}: no {CONFIG_FILE}; give the output_dir of a finished "
                                "'pinch-ray run pipelines/foundation.yaml'")
    with tempfile.TemporaryDirectory(prefix="pinch-ray-") as scratch:  # load_pipeline reads a local file
        local_config = Path(scratch) / CONFIG_FILE
        local_config.write_text(storage.read_text(config_path))
        cfg = load_pipeline(local_config, check_paths=False)
    metrics_path = storage.join(trial, METRICS_FILE)
    if not storage.is_file(metrics_path):
        raise FileNotFoundError(f"{trial}: no finished trial {FOUNDATION_TRIAL!r} ({METRICS_FILE} missing); "
                                f"finish the run first: pinch-ray run {config_path}")
    if cfg.model.init_from not in models.TINY_PRESETS or not cfg.corpus.synth_utterances:
        raise ValueError(f"{config_path}: a foundation starts from a tiny preset on the synthetic corpus "
                         f"(model.init_from: tiny, corpus.synth_utterances > 0); this run has "
                         f"model.init_from={cfg.model.init_from!r}, corpus.synth_utterances={cfg.corpus.synth_utterances}")
    if name is None:
        if cfg.name != models.FOUNDATION_PIPELINE:
            raise ValueError(f"{config_path}: run {cfg.name!r} is not pipelines/{models.FOUNDATION_PIPELINE}.yaml, "
                             f"which builds {models.DEFAULT_FOUNDATION}; name this foundation: --name <name>")
        name = models.DEFAULT_FOUNDATION
    metrics = json.loads(storage.read_text(metrics_path))
    corpus = {"synth_utterances": cfg.corpus.synth_utterances, "synth_seed": cfg.corpus.synth_seed}
    record = {
        "name": name,
        "rebuild": models.rebuild_command(cfg.name, name),
        "model": {"preset": cfg.model.init_from, "overrides": dict(cfg.model.overrides)},
        "corpus": {**corpus, "train_split": cfg.corpus.train_split, "eval_splits": list(cfg.corpus.eval_splits)},
        "training": dataclasses.asdict(cfg.baseline_train_config()),
        "code_version": _code_version(),
        **_provenance(),
        "run_versions": metrics.get("versions", {}),
        "results": {key: metrics[key] for key in ("wer", "cer", "params_total", "training_seconds") if key in metrics},
        "fingerprint": models.foundation_fingerprint(cfg.model.init_from, dict(cfg.model.overrides), corpus),
    }
    final = Path(dest_root or models.FOUNDATIONS_DIR) / name
    with storage.local_dir(storage.join(trial, "model")) as model_dir, storage.atomic_dir(final) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        (tmp / models.FOUNDATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(record))  # replaces the trial's card
    return final


def _model_card(record: dict) -> str:
    """The foundation's model card (the Hub's format): what it is, how it was built, its WER."""
    wer, cer = record["results"].get("wer", {}), record["results"].get("cer", {})
    rows = "\n".join(f"| {split} | {100 * wer[split]:.2f} | {100 * cer.get(split, float('nan')):.2f} |" for split in wer)
    corpus, training = record["corpus"], record["training"]
    return f"""---
library_name: transformers
pipeline_tag: automatic-speech-recognition
tags:
- pinch-ray
- synthetic-speech
---

# {record["name"]}

The `{record["model"]["preset"]}` wav2vec2 preset ({record["results"].get("params_total", 0):,} parameters,
overrides {record["model"]["overrides"]}) trained from random weights with CTC on the synthetic
espeak-ng corpus ({corpus["synth_utterances"]:,} utterances, seed {corpus["synth_seed"]}, split
`{corpus["train_split"]}`): {training["max_steps"]:,} steps of {training["batch_size"]} utterances, peak
learning rate {training["lr"]}. pinch_ray's synthetic pipelines compress it
(`model.init_from: {record["name"]}`), as the paper pipelines compress a pre-trained checkpoint.
Code version {record["code_version"]}{"" if record.get("rebuild_commit") else " (not a clean commit: see `uncommitted`)"};
everything else in `{models.FOUNDATION_FILE}`.

| split | WER (%) | CER (%) |
|---|---|---|
{rows}

Held-out sentences of the same corpus definition, greedy CTC decoding. Rebuild:

    {record["rebuild"]}
"""
