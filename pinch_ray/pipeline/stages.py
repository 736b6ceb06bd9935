"""The pipeline runner: prepare -> baseline -> compress -> finalize, each stage skipped when done.

    pinch-ray run pipelines/demo.yaml                        # the CLI calls run() below
    pinch-ray run pipelines/demo.yaml --from-stage finalize  # redo finalize (and what follows)

A finished stage writes ``<output_dir>/.stages/<stage>.done`` last (JSON: what it produced and a
fingerprint of the settings it used); a rerun skips it while the fingerprint matches. Inside a
stage, finished work is reused too: prepared shards (:mod:`pinch_ray.data.prepare`'s cache),
finished training runs (:mod:`pinch_ray.pipeline.runs`) and complete trial directories
(``report.finalize_trial``), so an interrupted run picks up where it stopped. The resolved config
is saved as ``<output_dir>/pipeline.yaml``.

An ``output_dir`` in an object store (``s3://...``, ``file://...``) is written through a local
staging copy (:class:`pinch_ray.storage.RemoteOutput`): pulled at the start (so a rerun on another
machine finds what finished), uploaded after each stage and each finalized trial, markers last; the
runs and checkpoints then go to ``<output_dir>/runs`` in the store unless ``storage_path`` says
otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

from pinch_ray import storage
from pinch_ray.config import (DENSE, FOUNDATION_TRIAL, ConfigError, EvalConfig, PipelineConfig, dump_pipeline,
                              raise_if_problems)
from pinch_ray.core import distill, models
from pinch_ray.core.compressor import prepare_method
from pinch_ray.core.export import trial_dir
from pinch_ray.data.batches import read_prepared_rows
from pinch_ray.data.features import read_report
from pinch_ray.data.prepare import PreparedSplit, prepare_split
from pinch_ray.data.synth import generate_corpus
from pinch_ray.pipeline import STAGES, runs
from pinch_ray.pipeline.report import TrialInfo, finalize_trial, read_trial_hypotheses, write_summary
from pinch_ray.pipeline.sweep import TrialJob, run_sweep, train_trial, trial_name
from pinch_ray.pipeline.worker import resource_problems, time_left

log = logging.getLogger(__name__)

STAGES_DIR = ".stages"
CONFIG_FILE = "pipeline.yaml"
# The config sections each stage's output depends on (its marker's fingerprint).
_STAGE_SECTIONS = {
    "prepare": ("corpus", "data"),
    "baseline": ("corpus", "data", "model", "training", "resources", "dense_baseline", "baseline_training"),
    "compress": ("corpus", "data", "model", "training", "resources", "dense_baseline", "baseline_training",
                 "gates", "sweep"),
    "finalize": ("corpus", "data", "model", "training", "resources", "dense_baseline", "baseline_training",
                 "gates", "sweep", "evaluation"),
}


def marker_path(output_dir: str | os.PathLike, stage: str) -> Path:
    return Path(output_dir) / STAGES_DIR / f"{stage}.done"


def fingerprint(cfg: PipelineConfig, stage: str) -> str:
    """Hash of the settings ``stage``'s output depends on."""
    settings = {key: getattr(cfg, key) for key in _STAGE_SECTIONS[stage]}
    text = json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in settings.items()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_marker(cfg: PipelineConfig, stage: str) -> dict | None:
    """The outputs a finished ``stage`` recorded, or None when it must (re)run."""
    path = marker_path(cfg.output_dir, stage)
    if not path.is_file():
        return None
    marker = json.loads(path.read_text())
    if marker.get("fingerprint") != fingerprint(cfg, stage):
        log.warning("stage %s: settings changed since it finished; running it again", stage)
        return None
    return marker["outputs"]


def _write_marker(cfg: PipelineConfig, stage: str, outputs: dict) -> None:
    path = marker_path(cfg.output_dir, stage)
    marker = {"fingerprint": fingerprint(cfg, stage), "outputs": outputs}
    storage.write_text(path, json.dumps(marker, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Stages: each takes the config and the earlier stages' outputs, returns its own (JSON-able)
# ------------------------------------------------------------------------------------------------


def _model_vocab(cfg: PipelineConfig) -> dict[str, int]:
    if cfg.model.init_from in models.TINY_PRESETS:
        return dict(models.CHAR_VOCAB)
    processor = models.load_processor(cfg.model.init_from, cfg.model.trust_remote_code)
    return processor.tokenizer.get_vocab()


def model_problems(cfg: PipelineConfig) -> list[str]:
    """Problems only the model shows, found before anything runs: ``model.init_from`` cannot be
    read, a gate pattern matches no layer, or a sweep target the gated layers cannot reach
    (``sweep.target_basis: params``). Builds the model on the ``meta`` device: no weights are read."""
    try:
        skeleton = models.model_skeleton(cfg.model.init_from, cfg.model.trust_remote_code, **cfg.model.overrides)
    except (OSError, ValueError, KeyError) as error:
        return [f"model.init_from: cannot load {cfg.model.init_from!r} ({models.load_error_reason(error)}); "
                "name a preset (tiny, tiny-hubert, tiny-wavlm), a checkpoint directory, or a hub id this machine "
                "can reach"]
    problems = []
    if cfg.training.distill_hidden:
        problems += distill.layer_problems(skeleton.config.num_hidden_layers, cfg.training.distill_layers)
    for method, target in cfg.sweep.trials():  # the seeds change no shapes
        try:
            prepare_method(copy.deepcopy(skeleton), method, target, cfg.gates, cfg.sweep.target_basis)
        except ConfigError as error:
            problems += [f"sweep ({trial_name(method, target)}): {problem}" for problem in error.problems]
    return list(dict.fromkeys(problems))


def ensure_corpus(cfg: PipelineConfig) -> None:
    """Generate the synthetic corpus at ``corpus.root`` when it is missing and
    ``corpus.synth_utterances`` > 0 (an existing root is used as it is)."""
    root = cfg.corpus.root
    if cfg.corpus.synth_utterances and not storage.is_uri(root) and not os.path.isdir(root):
        log.info("generating the synthetic corpus (%d utterances) at %s", cfg.corpus.synth_utterances, root)
        generate_corpus(root, cfg.corpus.synth_utterances, seed=cfg.corpus.synth_seed, progress=False)


def stage_prepare(cfg: PipelineConfig, outputs: dict) -> dict:
    ensure_corpus(cfg)
    vocab = _model_vocab(cfg)
    splits, names, started = {}, cfg.corpus.splits(), time.perf_counter()
    cpus = cfg.resources.capacity(ray.cluster_resources())["CPU"]  # what is up, or what it can grow to
    for number, split in enumerate(names, start=1):
        log.info("prepare: split %d/%d, %s ...", number, len(names), split)
        prepared = prepare_split(cfg.corpus, split, vocab, cfg.data, num_cpus=cpus)
        splits[split] = {"path": prepared.path, "num_utterances": prepared.num_utterances}
        log.info("prepare: split %d/%d, %s: %d utterances%s (%s)", number, len(names), split,
                 prepared.num_utterances, " (cached)" if prepared.from_cache else "",
                 time_left(time.perf_counter() - started, number, len(names)))
    return splits


def _prepared(outputs: dict) -> dict:
    """``{split: PreparedSplit}`` from the prepare stage's outputs."""
    return {split: PreparedSplit(entry["path"], read_report(entry["path"]), from_cache=True)
            for split, entry in outputs["prepare"].items()}


def stage_baseline(cfg: PipelineConfig, outputs: dict) -> dict:
    if not cfg.runs_baseline():
        log.info("baseline: nothing to train here (%s)", "the compress stage trains the dense reference beside "
                 "the compression trials" if cfg.sweep_trains_dense() else "dense_baseline: false")
        return {}
    name = cfg.baseline_trial()
    job = TrialJob.create(cfg, _prepared(outputs), cfg.model.init_from, cfg.output_dir)
    return {name: str(train_trial(job, DENSE, 0.0, name=name, training=cfg.baseline_train_config()))}


def compression_init_from(cfg: PipelineConfig, outputs: dict) -> str:
    """Where compression trials start: the dense baseline's folded model (``sweep.init_from_dense``)
    or ``model.init_from``."""
    if cfg.sweep.init_from_dense:
        return runs.model_dir(outputs["baseline"][cfg.baseline_trial()])
    return cfg.model.init_from


def stage_compress(cfg: PipelineConfig, outputs: dict) -> dict:
    # the baseline is the dense reference when the trials do not start from it and the sweep trains
    # none per seed (two-stage prunes it)
    dense = {None: outputs["baseline"][DENSE]} if DENSE in outputs["baseline"] else {}
    result_dirs = run_sweep(cfg, _prepared(outputs), compression_init_from(cfg, outputs), cfg.output_dir,
                            dense_results=dense)
    return {name: str(path) for name, path in result_dirs.items()}


def evaluation_settings(cfg: PipelineConfig, cluster: dict[str, float]) -> EvalConfig:
    """``cfg.evaluation`` with ``gpus_per_actor`` decided where it is unset: one GPU per actor when
    the cluster has GPUs up (``cluster``: Ray's ``cluster_resources()``) or can grow to them
    (``resources.cluster_max.GPU``), else 0. An autoscaling GPU cluster whose GPU nodes are not up
    yet when finalize starts then asks for GPU actors (the autoscaler adds the nodes) instead of
    transcribing every trial on CPU."""
    if cfg.evaluation.gpus_per_actor is not None:
        return cfg.evaluation
    gpus = 1.0 if cfg.resources.capacity(cluster)["GPU"] > 0 else 0.0
    return dataclasses.replace(cfg.evaluation, gpus_per_actor=gpus)


def stage_finalize(cfg: PipelineConfig, outputs: dict, overwrite: bool = False, publish=lambda: 0) -> dict:
    """Export, store, evaluate and report every trial, then the summary; ``publish`` is called after
    each trial (an output directory in an object store uploads it)."""
    prepared = _prepared(outputs)
    # evaluation.num_actors > 0: a Ray Data actor pool over these datasets (reusable for every
    # trial); 0: this process reads the shards itself (a fresh reader per trial)
    datasets = ({split: prepared[split].dataset() for split in cfg.corpus.eval_splits}
                if cfg.evaluation.num_actors else None)
    evaluation = evaluation_settings(cfg, ray.cluster_resources() if datasets else {})
    trials = {**outputs["baseline"], **outputs["compress"]}
    results = {name: runs.read_train_result(result_dir) for name, result_dir in trials.items()}
    # The dense references ("dense", or "dense-seed<k>" with sweep.seeds) go first: every other trial
    # is compared with the reference of its seed, else with "dense"; a two-stage trial's time adds
    # that reference's, the run it started from.
    references = {(None if name == DENSE else results[name].get("seed")): name for name in trials
                  if results[name]["method"] == DENSE and name != FOUNDATION_TRIAL}
    dense_hypotheses = {}  # reference name -> {split: utterances}
    order, started = sorted(trials, key=lambda name: name not in references.values()), time.perf_counter()
    for number, name in enumerate(order, start=1):
        log.info("finalize: trial %d/%d, %s ...", number, len(order), name)
        result = results[name]
        reference = (None if name in references.values()
                     else references.get(result.get("seed"), references.get(None)))
        info = TrialInfo.from_train_result(name, result, reference,
                                           results[reference].get("compression_seconds") if reference else None,
                                           base_model=cfg.model.init_from, corpus=cfg.corpus.root)
        with storage.local_dir(runs.model_dir(trials[name])) as model_dir:  # a copy if remote
            model, processor = models.load_model(str(model_dir))
        eval_data = datasets or {split: read_prepared_rows(prepared[split].path) for split in cfg.corpus.eval_splits}
        finalize_trial(model, processor, info, cfg.output_dir, eval_data,
                       dense_hypotheses=dense_hypotheses.get(reference), eval_cfg=evaluation,
                       gate_patterns=cfg.gates.for_method(info.method).all_patterns(), data_cfg=cfg.data,
                       overwrite=overwrite)
        if name in references.values():
            dense_hypotheses[name] = read_trial_hypotheses(trial_dir(cfg.output_dir, name))
        publish()
        log.info("finalize: trial %d/%d, %s done (%s)", number, len(order), name,
                 time_left(time.perf_counter() - started, number, len(order)))
    write_summary(cfg.output_dir)
    return {name: str(trial_dir(cfg.output_dir, name)) for name in trials}


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------


def stages_to_run(from_stage: str | None = None, only: str | None = None) -> set[str]:
    """Stages forced to run again (their markers ignored): ``from_stage`` and every later one, or ``only``.

    Raises:
        ValueError: unknown stage, or both given.
    """
    if from_stage and only:
        raise ValueError("give --from-stage or --only, not both")
    for stage in (from_stage, only):
        if stage and stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if only:
        return {only}
    if from_stage:
        return set(STAGES[STAGES.index(from_stage):])
    return set()


def run(cfg: PipelineConfig, *, from_stage: str | None = None, only: str | None = None) -> dict[str, Any]:
    """Run the pipeline ``cfg`` (validated by ``load_pipeline``); returns every stage's outputs.

    Ray must be initialised (the CLI calls ``ray.init()``). ``from_stage`` / ``only`` redo that
    stage (and, for ``from_stage``, the later ones) even if finished; with ``only``, the earlier
    stages must have finished. A redone baseline/compress reuses finished training runs (delete
    ``<storage_path or output_dir/runs>/<trial>`` to retrain one); a redone finalize rewrites every
    trial directory.

    Raises:
        ValueError: bad ``from_stage`` / ``only``, or ``only`` before its earlier stages finished.
        ConfigError: what :func:`model_problems` finds (checked here too, so the Python API refuses
            an unreachable target before anything is written, as the CLI does before Ray starts),
            resources the cluster cannot give a training run (GPUs it does not have, fractional
            GPUs shared by the ranks of one run), or
            another run is writing ``output_dir`` (``<output_dir>.lock``, held while a run lasts).
        RuntimeError / ray.train.TrainingFailedError: a stage failed; finished work is kept.
    """
    forced = stages_to_run(from_stage, only)
    raise_if_problems(model_problems(cfg))
    if ray.is_initialized():  # what every training run would refuse inside its trial (after the corpus
        # was prepared, as one failed trial after another), refused before anything is written
        raise_if_problems(resource_problems(cfg.resources, ray.cluster_resources()), source="resources")
    remote = storage.RemoteOutput(cfg.output_dir) if storage.is_uri(cfg.output_dir) else None
    # One run at a time writes an output directory (a second would clear or overwrite the first
    # one's files mid-run; for a URI, its staging copy on this machine): the second is refused.
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(remote.locked(wait=False) if remote is not None
                               else storage.exclusive(cfg.output_dir, cfg.output_dir, wait=False))
        except storage.Busy as busy:
            raise ConfigError([f"output_dir: {busy}; wait for that run to finish, or give this one another "
                               "output_dir"]) from None
        return _run_stages(cfg, remote, forced, only)


def _run_stages(cfg: PipelineConfig, remote: storage.RemoteOutput | None, forced: set[str],
                only: str | None) -> dict[str, Any]:
    settings = dump_pipeline(cfg)
    if remote is not None:  # the stages write a local copy; the runs go to the store
        cfg = dataclasses.replace(cfg, output_dir=str(remote.pull()), storage_path=cfg.run_storage())
    publish = remote.publish if remote is not None else (lambda: 0)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(output_dir / CONFIG_FILE, settings)
    for stage in forced:
        marker_path(output_dir, stage).unlink(missing_ok=True)
    functions = {"prepare": stage_prepare, "baseline": stage_baseline, "compress": stage_compress,
                 "finalize": stage_finalize}
    outputs: dict[str, Any] = {}
    started_all = time.perf_counter()
    try:
        publish()
        for number, stage in enumerate(STAGES, start=1):
            label = f"[stage {number}/{len(STAGES)}] {stage}"
            recorded = _read_marker(cfg, stage)
            if recorded is not None:
                outputs[stage] = recorded
                log.info("%s ... already done (%s); skipped", label, marker_path(output_dir, stage))
                continue
            if only and stage != only:
                raise ValueError(f"--only {only}: stage {stage} has not finished; run the pipeline without --only first")
            log.info("%s ...", label)
            started = time.perf_counter()
            kwargs = {"overwrite": stage in forced, "publish": publish} if stage == "finalize" else {}
            outputs[stage] = functions[stage](cfg, outputs, **kwargs)
            _write_marker(cfg, stage, outputs[stage])
            publish()
            log.info("%s ... done in %.1f s", label, time.perf_counter() - started)
            if stage == only:
                break
    except BaseException:
        if remote is not None:  # what finished before the failure (trials, logs) reaches the store
            try:
                publish()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.exception("output %s: could not upload what finished", remote.uri)
        raise
    log.info("pipeline %s finished in %.1f s; outputs in %s", cfg.name, time.perf_counter() - started_all,
             remote.uri if remote is not None else output_dir)
    return outputs
