"""The compression sweep on Ray Tune: one trial per (method, target sparsity), each a Ray Train run.

Every Tune trial is a driver function that builds a ``TorchTrainer`` (the Ray Train V2 pattern,
not the deprecated Trainer-in-Tuner): :func:`train_trial` runs the training under the run name
of the trial (``sspg-0.65``) in the run storage (``storage_path``: a local directory or an
object-store URI; default ``<output_dir>/runs``), so

- a trial whose final checkpoint (``train_result.json`` + ``model/``) exists is not retrained,
  provided it was trained with the same settings (:func:`run_settings`, recorded in
  ``train_result.json``); one trained with other settings stops the run with what changed, before
  anything trains (a changed ``gates.tau_end`` must not be reported under a finished run's figures);
- an interrupted trial resumes its own Ray Train run from its last checkpoint.

The Train workers are scheduled by Ray Train outside the Tune trial's own (near-zero) reservation,
so Tune cannot see them: :func:`max_concurrent_trials` sizes the parallelism from the cluster's
CPUs/GPUs (what is up, or what an autoscaling cluster can grow to: ``resources.cluster_max``) and
the per-trial resources, and the remaining trials queue. The trials themselves run on the head node
(:data:`DRIVER_RESOURCES`), so a lost worker node never takes a trial's driver with it.

    from pinch_ray.pipeline.sweep import run_sweep
    result_dirs = run_sweep(cfg, prepared, init_from="runs/demo/runs/dense/step-0000060/model",
                            output_dir=cfg.output_dir)   # {"sspg-0.5": "<storage>/sspg-0.5/step-...", ...}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pinch_ray import storage
from pinch_ray.config import (DENSE, RUNS_DIR, ConfigError, GateConfig, PipelineConfig, ResourcesConfig, TrainConfig,
                              load_pipeline)
from pinch_ray.core import models
from pinch_ray.pipeline import runs
from pinch_ray.pipeline.worker import MetricsLog, run_training, tune_report_callback, worker_config

log = logging.getLogger(__name__)

# <output_dir>/logs/<trial>.jsonl and logs/<trial>/ (TensorBoard events): rank 0's metrics of every report
LOGS_DIR = "logs"
SWEEP_NAME = "sweep"  # the Ray Tune experiment, <run storage>/sweep
# CPUs kept free of Train workers when sizing the sweep, for Ray Data to stream training batches.
DATA_CPU_RESERVE = 1.0
# What a Tune trial itself reserves: it only waits on its TorchTrainer (whose workers reserve
# their own resources), so it must not hold CPUs they or Ray Data need (Ray Data tasks take a
# whole CPU: even 0.01 CPU per trial would starve them on a 2-CPU machine). Tune refuses an
# empty request, so the trial reserves a little memory (bytes) instead, and a sliver of the head
# node's own resource: trials run on the head, where the job's driver runs, and so do their Train
# controllers (Ray Train keeps a controller on its driver's node), so losing a worker node costs a
# trial only its workers, which Ray Train restarts from the last checkpoint (resources.max_failures).
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's: 1.0 on the head node, absent elsewhere
DRIVER_RESOURCES = {"CPU": 0, "memory": 100 * 1024**2, HEAD_NODE_RESOURCE: 0.001}


def trial_name(method: str, target_sparsity: float, seed: int | None = None) -> str:
    """Run and artifact directory name of a trial: ``sspg-0.65``, ``ump-0.5``, ``dense``; with a
    seed (``sweep.seeds``) ``sspg-0.65-seed1``, ``dense-seed1``."""
    name = DENSE if method == DENSE else f"{method}-{target_sparsity:g}"
    return name if seed is None else f"{name}-seed{seed}"


# Keys of a run's worker config and training settings that do not change what it trains (where it
# reports, evaluates, checkpoints; intra-op threads), so a finished run is reused whatever they are.
_NOT_SETTINGS = ("dev_path", "settings")
_NOT_TRAINING_SETTINGS = ("report_every", "checkpoint_every", "eval_every", "eval_batch_size", "torch_threads")


class SettingsChangedError(ValueError):
    """A finished run was trained with other settings than the ones the pipeline asks for now
    (bad input: the command line exits 2 with the message)."""


def run_settings(config: dict, train_path: str, num_workers: int) -> dict:
    """What a run's result depends on: its worker config (``dense`` ignores the gates), the
    prepared train split (its cache directory name is a hash of the corpus and data settings), the
    number of DDP ranks, and the settings of the run its starting model came from (so trials of a
    retrained baseline are not reused) in place of that model's path. JSON-normalised."""
    settings = {key: value for key, value in config.items() if key not in _NOT_SETTINGS}
    settings["training"] = {key: value for key, value in config["training"].items()
                            if key not in _NOT_TRAINING_SETTINGS}
    if config["method"] == DENSE:  # prunes nothing: no gates, no target
        settings.pop("gates")
        settings.pop("target_basis")
    training = settings["training"]
    if config["method"] == DENSE or not (training["distill_logits"] or training["distill_hidden"]):
        for key in [key for key in training if key.startswith("distill_")]:  # no teacher: they change nothing
            training.pop(key)
    foundation = models.foundation_record(config["init_from"])
    if foundation is not None:  # a shipped foundation: the build, not the name (a rebuild retrains)
        settings["init_from"] = {"foundation": foundation["fingerprint"], "code_version": foundation["code_version"],
                                 "results": foundation["results"]}
    settings["train_data"] = Path(train_path).name
    settings["num_workers"] = num_workers
    upstream = runs.result_dir_of(config["init_from"])  # starts from a run of ours (the baseline)
    if upstream is not None:
        recorded = runs.read_train_result(upstream).get("settings")
        if recorded is not None:
            settings["init_from"] = {"run_settings": recorded}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Settings added after runs were first recorded, each with the value that trains as the runs
# recorded without it did: such a run is reused (or resumed) where the setting asks for that value.
# A new setting of the gates or the training belongs here, or every earlier run stops the sweep.
SETTINGS_ADDED = {"gates.regrow": False, "gates.threshold_schedule": "lr", "gates.masked_update": False,
                  "gates.mask_ranking": "global", "gates.mask_update_every": 10}


def _read_by_method(settings: dict) -> dict:
    """``settings`` without the gate settings its ``method`` does not read (``GateConfig.unread_by``;
    all kept where the method is not recorded): a change of one of those, a new default included,
    leaves the method's finished runs reusable."""
    method, gate_settings = settings.get("method"), settings.get("gates")
    if method is None or not isinstance(gate_settings, dict):
        return settings
    unread = GateConfig.unread_by(method)
    return {**settings, "gates": {key: value for key, value in gate_settings.items() if key not in unread}}


def _changes(recorded: Any, wanted: Any, key: str = "") -> list[str]:
    """``key: recorded -> wanted`` for every leaf where the two settings dicts differ (a setting of
    :data:`SETTINGS_ADDED` the recorded run lacks counts as its older value)."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        changes = []
        for k in sorted(set(recorded) | set(wanted)):
            path = f"{key}.{k}" if key else k
            changes += _changes(recorded.get(k, SETTINGS_ADDED.get(path)), wanted.get(k), path)
        return changes
    return [] if recorded == wanted else [f"{key}: {_short(recorded)} -> {_short(wanted)}"]


def reusable_result_dir(job: "TrialJob", name: str, config: dict) -> str | None:
    """The final checkpoint directory of run ``name`` if it finished with ``config``'s settings;
    None when it has not finished (an unfinished run with the same settings resumes from its last
    checkpoint).

    Raises:
        SettingsChangedError: it finished, or has a checkpoint, with other settings (what changed,
            and how to go on): resuming would continue another run's training under this one's name.
    """
    done = runs.final_result_dir(job.storage_path, name)
    if done is None:
        checkpoint = runs.latest_checkpoint(job.storage_path, name)
        recorded = runs.read_checkpoint_settings(checkpoint) if checkpoint else None
        if recorded is not None:  # (checkpoints of an older pinch_ray record none: resumed as before)
            _raise_if_changed(job, name, recorded, config["settings"],
                              f"an unfinished run (checkpoint {posixpath.basename(checkpoint)})")
        return None
    recorded = runs.read_train_result(done).get("settings")
    if recorded is None:
        log.warning("trial %s: the finished run %s recorded no settings (made by an older pinch_ray); "
                    "reused as it is", name, done)
        return done
    _raise_if_changed(job, name, recorded, config["settings"], "a finished run")
    return done


def _raise_if_changed(job: "TrialJob", name: str, recorded: dict, wanted: dict, what: str) -> None:
    changes = _changes(_read_by_method(recorded), _read_by_method(wanted))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        run_dir = runs.run_dir(job.storage_path, name)
        raise SettingsChangedError(
            f"trial {name}: {what} with other settings is in {run_dir} ({shown}). Delete that "
            f"directory to train {name} again with the settings asked for now, or set output_dir (or "
            "storage_path) to a new place to keep both.")


@dataclass
class TrialJob:
    """Everything a trial needs besides its (method, target): plain values, sent to Tune trials."""

    cfg: PipelineConfig
    init_from: str  # model.init_from, or the dense baseline's folded model/ directory
    train_path: str  # prepared train split: parquet shards
    train_files: list[str]
    train_rows: int
    dev_path: str | None  # prepared dev split (evaluated during training), None: none
    output_dir: str
    storage_path: str  # Ray Train/Tune runs: PipelineConfig.run_storage()

    @classmethod
    def create(cls, cfg: PipelineConfig, prepared: dict[str, Any], init_from: str,
               output_dir: str | os.PathLike) -> "TrialJob":
        """``prepared``: ``{split: PreparedSplit}``; the first eval split is evaluated during training."""
        train = prepared[cfg.corpus.train_split]
        dev = prepared[cfg.corpus.eval_splits[0]] if cfg.corpus.eval_splits else None
        return cls(cfg=cfg, init_from=models.portable_init_from(str(init_from)), train_path=train.path,
                   train_files=train.files, train_rows=train.num_utterances, dev_path=dev.path if dev else None,
                   output_dir=os.fspath(output_dir), storage_path=cfg.run_storage())


def trial_config(job: TrialJob, method: str, target_sparsity: float, name: str,
                 training: TrainConfig | None = None, init_from: str | None = None) -> dict:
    """The worker config of trial ``name``, with its :func:`run_settings` under ``settings``.
    ``init_from``: where this trial starts, if not ``job.init_from`` (two-stage: the dense trial)."""
    cfg = job.cfg
    config = worker_config(init_from or job.init_from, method, target_sparsity, training or cfg.training,
                           cfg.gates, train_rows=job.train_rows, target_basis=cfg.sweep.target_basis,
                           dev_path=job.dev_path, bucket_window_batches=cfg.data.bucket_window_batches,
                           model_overrides=cfg.model.overrides, trust_remote_code=cfg.model.trust_remote_code)
    config["settings"] = run_settings(config, job.train_path, cfg.resources.num_workers)
    return config


def seeded(training: TrainConfig, seed: int | None) -> TrainConfig:
    """``training`` with ``seed`` as its ``training.seed`` (None: as it is)."""
    return training if seed is None else dataclasses.replace(training, seed=seed)


def train_trial(job: TrialJob, method: str, target_sparsity: float, *, seed: int | None = None,
                name: str | None = None, training: TrainConfig | None = None, init_from: str | None = None) -> str:
    """Train one trial (or reuse its finished run); returns its final checkpoint directory.

    ``seed``: ``training.seed`` of this trial (a ``sweep.seeds`` entry; None: the configured one);
    ``init_from``: its starting model, if not ``job.init_from`` (two-stage: the dense trial's model);
    ``name``: the run name (default :func:`trial_name`); ``training``: settings other than
    ``job.cfg.training`` (the dense baseline's).

    Raises:
        SettingsChangedError: the run finished earlier with other settings.
        ray.train.TrainingFailedError: the run failed more than ``resources.max_failures`` times.
        RuntimeError: the run ended without a final checkpoint.
    """
    from pinch_ray.data.prepare import read_shards

    cfg, name = job.cfg, name or trial_name(method, target_sparsity, seed)
    training = seeded(training or cfg.training, seed)
    init_from = init_from or job.init_from
    config = trial_config(job, method, target_sparsity, name, training, init_from)
    done = reusable_result_dir(job, name, config)
    if done is not None:
        log.info("trial %s: finished run found (%s); not retrained", name, done)
        return done
    logs = Path(job.output_dir) / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    log.info("trial %s: training %d steps from %s", name, training.max_steps, init_from)
    callbacks = [MetricsLog(logs / f"{name}.jsonl", name, training.max_steps, tensorboard_dir=logs / name),
                 tune_report_callback()]
    result = run_training(config, read_shards(job.train_files, training.seed), cfg.resources, name=name,
                          storage_path=job.storage_path, callbacks=[c for c in callbacks if c is not None])
    if result.error is not None:
        raise result.error
    done = runs.final_result_dir(job.storage_path, name)
    if done is None:
        raise RuntimeError(f"trial {name}: the run ended without a final checkpoint under "
                           f"{runs.run_dir(job.storage_path, name)}")
    return done


def _trial_driver(config: dict, job: TrialJob) -> None:
    """A Tune trial: train ``config["trial"]`` and report where its final checkpoint is."""
    from ray import tune

    trial = config["trial"]
    done = train_trial(job, trial["method"], trial["target_sparsity"], seed=trial["seed"],
                       init_from=trial["init_from"])
    tune.report({"result_dir": str(done),
                 "trial": trial_name(trial["method"], trial["target_sparsity"], trial["seed"])})


def max_concurrent_trials(resources: ResourcesConfig, num_trials: int, cluster: dict[str, float],
                          requested: int = 0) -> int:
    """How many trials run at once: ``requested`` if > 0, else as many as the cluster holds with
    :data:`DATA_CPU_RESERVE` CPUs kept for Ray Data, counting what it can grow to
    (:meth:`ResourcesConfig.capacity` of ``cluster``, Ray's ``cluster_resources()``, and
    ``resources.cluster_max``); at least 1 (the rest queue), at most ``num_trials``."""
    if requested > 0:
        return max(1, min(requested, num_trials))
    capacity = resources.capacity(cluster)
    fits = math.floor((capacity["CPU"] - DATA_CPU_RESERVE) / (resources.num_workers * resources.cpus_per_worker))
    if resources.use_gpu:
        fits = min(fits, math.floor(capacity["GPU"] / (resources.num_workers * resources.gpus_per_worker) + 1e-9))
    return max(1, min(fits, num_trials))


def run_sweep(cfg: PipelineConfig, prepared: dict[str, Any], init_from: str, output_dir: str | os.PathLike, *,
              dense_results: dict[int | None, str] | None = None) -> dict[str, str]:
    """Run every trial of ``cfg.compression_trials()`` (the compression trials of ``cfg.sweep``, and
    the ``dense`` references when they start from the baseline) on Ray Tune; returns ``{trial: final
    checkpoint dir}``.

    ``two-stage`` trials start from the finished dense trial of their seed, so they run in a second
    wave once the first has finished; ``dense_results`` names dense runs finished before the sweep
    (``{None: <the baseline's final checkpoint dir>}`` when the baseline is the dense reference).
    ``prepared``: ``{split: PreparedSplit}`` with the train split (and ``dev``-like eval splits;
    the first eval split is evaluated during training). Finished trials are reused (see the module
    docstring); Ray must be initialised.

    Raises:
        SettingsChangedError: a trial finished earlier with other settings (nothing was trained).
        RuntimeError: some trials failed (listed); the finished ones are kept for a rerun.
    """
    trials = cfg.compression_trials()
    if not trials:
        return {}
    job = TrialJob.create(cfg, prepared, init_from, output_dir)
    dense = dict(dense_results or {})
    reused = reused_dense_references(job, trials)  # sweep.dense_from
    dense.update({seed: reused[trial_name(m, t, seed)] for m, t, seed in trials if trial_name(m, t, seed) in reused})
    trials = [trial for trial in trials if trial_name(*trial) not in reused]
    for method, target, seed in trials:  # a finished trial with other settings stops the sweep up front
        if method == DENSE:
            dense.setdefault(seed, runs.final_result_dir(job.storage_path, trial_name(method, target, seed)))
        start = _start_of(method, seed, dense)
        if method != "two-stage" or start:  # a two-stage trial whose dense run is not finished: checked later
            name = trial_name(method, target, seed)
            config = trial_config(job, method, target, name, seeded(cfg.training, seed), start)
            reusable_result_dir(job, name, config)
    done = {**reused, **_run_wave(job, [t for t in trials if t[0] != "two-stage"], SWEEP_NAME, dense)}
    second = [t for t in trials if t[0] == "two-stage"]
    if second:
        dense.update({seed: done[trial_name(m, t, seed)] for m, t, seed in trials if m == DENSE})
        done.update(_run_wave(job, second, f"{SWEEP_NAME}-two-stage", dense))
    return done


def dense_source_storage(dense_from: str) -> str:
    """Where the run at output_dir ``dense_from`` keeps its training runs: its recorded
    ``storage_path``, else ``<dense_from>/runs``.

    Raises:
        ConfigError: ``dense_from`` holds no ``pipeline.yaml`` (not a run's output_dir).
    """
    config_file = Path(dense_from) / "pipeline.yaml"
    if not config_file.is_file():
        raise ConfigError([f"sweep.dense_from: {dense_from} has no pipeline.yaml; name the output_dir of the run "
                           "whose dense references to reuse, or remove sweep.dense_from"])
    recorded = load_pipeline(config_file, check_paths=False)
    return recorded.storage_path or storage.join(str(Path(dense_from).resolve()), RUNS_DIR)


def reused_dense_references(job: TrialJob, trials: list[tuple[str, float, int | None]]) -> dict[str, str]:
    """``{trial: final checkpoint dir}`` of the dense references of ``trials`` that the run at
    ``sweep.dense_from`` finished with this sweep's settings; a reference it has not finished is
    trained here (so it is left out).

    Raises:
        SettingsChangedError: one finished there with other settings (reusing it would compare this
            sweep's trials with a reference trained otherwise).
    """
    dense_from = job.cfg.sweep.dense_from
    if not dense_from:
        return {}
    source = dataclasses.replace(job, storage_path=dense_source_storage(dense_from))
    reused = {}
    for method, target, seed in trials:
        if method != DENSE:
            continue
        name = trial_name(method, target, seed)
        config = trial_config(job, method, target, name, seeded(job.cfg.training, seed))
        try:
            found = reusable_result_dir(source, name, config)
        except SettingsChangedError as changed:
            raise SettingsChangedError(f"sweep.dense_from: {changed} Or remove sweep.dense_from to train {name} "
                                       "here.") from None
        if found is None:
            log.info("trial %s: not finished in sweep.dense_from (%s); trained here", name, dense_from)
        else:
            log.info("trial %s: reused from sweep.dense_from (%s)", name, found)
            reused[name] = found
    return reused


def _start_of(method: str, seed: int | None, dense: dict[int | None, str | None]) -> str | None:
    """Where a trial starts if not the job's ``init_from``: a two-stage trial from the final model of
    the dense run of its seed (else the one without a seed); None otherwise, or when not finished."""
    if method != "two-stage":
        return None
    result_dir = dense.get(seed) or dense.get(None)
    return runs.model_dir(result_dir) if result_dir else None


def _run_wave(job: TrialJob, trials: list[tuple[str, float, int | None]], experiment: str,
              dense: dict[int | None, str | None]) -> dict[str, str]:
    """One Ray Tune run over ``trials``; returns ``{trial: final checkpoint dir}``.

    Raises:
        RuntimeError: some trials did not finish (listed).
    """
    import ray
    from ray import tune

    if not trials:
        return {}
    cfg = job.cfg
    concurrent = max_concurrent_trials(cfg.resources, len(trials), ray.cluster_resources(),
                                       cfg.sweep.max_concurrent_trials)
    log.info("sweep: %d trials (%s), %d at a time", len(trials),
             ", ".join(trial_name(*trial) for trial in trials), concurrent)
    grid = [{"method": method, "target_sparsity": float(target), "seed": seed,
             "init_from": _start_of(method, seed, dense)} for method, target, seed in trials]
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial_driver, job=job), DRIVER_RESOURCES),
        param_space={"trial": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=experiment, storage_path=job.storage_path,
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    out, failed = {}, []
    for trial in trials:
        name = trial_name(*trial)
        done = runs.final_result_dir(job.storage_path, name)
        if done is None:
            failed.append(name)
        else:
            out[name] = done
    if failed:
        errors = [str(result.error).splitlines()[0] for result in results if result.error is not None]
        raise RuntimeError(f"sweep: trials {failed} did not finish ({'; '.join(errors) or 'no error reported'}); "
                           "rerun the same command to resume them (finished trials are kept)")
    return out
