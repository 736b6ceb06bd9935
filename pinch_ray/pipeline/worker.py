"""The Ray Train side of training: the per-worker function that runs a :class:`Compressor` under
DDP, the driver that starts it as a ``TorchTrainer``, and the callbacks that log and print progress.

A worker loads its starting model, builds the Compressor, resumes from Ray Train's checkpoint if
there is one, and steps through its shard of the training data; every ``report_every`` steps it
reports, every ``checkpoint_every`` steps (and at the end) rank 0 checkpoints. At the end rank 0
calibrates, evaluates the dev split and writes the final checkpoint (:mod:`pinch_ray.pipeline.runs`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import os
import queue
import socket
import tempfile
import threading
import time

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pinch_ray import storage
from pinch_ray.config import GateConfig, ResourcesConfig, TrainConfig, raise_if_problems, target_sparsity_problems
from pinch_ray.core import gates as gates_lib
from pinch_ray.core.compressor import Compressor
from pinch_ray.core.models import checkpoint_path, freeze_unused_parameters, has_trained_head, load_model
from pinch_ray.core.scoring import score, transcribe_rows
from pinch_ray.data.batches import batches_per_epoch, iter_train_batches, read_prepared_rows
from pinch_ray.pipeline import debug, runs

log = logging.getLogger(__name__)


def worker_config(init_from: str, method: str, target_sparsity: float, train_cfg: TrainConfig,
                  gate_cfg: GateConfig, *, train_rows: int, target_basis: str = "params",
                  dev_path: str | None = None, bucket_window_batches: int = 20, model_overrides: dict | None = None,
                  trust_remote_code: bool = False) -> dict:
    """The plain dict :func:`train_loop_per_worker` takes (validated here, before Ray starts).

    ``train_rows``: utterances of the prepared train split (fixes the batches per epoch per rank);
    ``target_basis``: what ``target_sparsity`` is a fraction of (``SweepConfig.target_basis``);
    ``dev_path``: prepared dev shards, evaluated on rank 0 every ``eval_every`` steps;
    ``bucket_window_batches``: length bucketing of the training batches (``DataConfig``).
    """
    raise_if_problems(train_cfg.problems() + gate_cfg.problems()
                      + target_sparsity_problems(method, target_sparsity, target_basis=target_basis),
                      source="training settings")
    return {"init_from": str(init_from), "method": method, "target_sparsity": float(target_sparsity),
            "target_basis": target_basis,
            "training": dataclasses.asdict(train_cfg), "gates": dataclasses.asdict(gate_cfg),
            "train_rows": int(train_rows), "dev_path": str(dev_path) if dev_path else None,
            "bucket_window_batches": int(bucket_window_batches),
            "model_overrides": dict(model_overrides or {}), "trust_remote_code": bool(trust_remote_code)}


def _threshold_rank_spread(run: Compressor) -> float:
    """Largest difference of any gate threshold between DDP ranks (0.0: in sync, as it must be)."""
    thresholds = [g.threshold.detach() for g in gates_lib.gates_of(run.unwrapped)]
    if not thresholds or not torch.distributed.is_initialized():
        return 0.0
    high = torch.stack(thresholds).float()
    low = high.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    return float((high - low).max())


def _dev_scores(run: Compressor, processor, dev_path: str, batch_size: int) -> dict:
    """Dev WER/CER of ``run``'s model, on rank 0 while the other ranks wait: under the training
    step's autocast (``run.autocast_dtype``: bf16 on a GPU, none on a CPU) and, on a GPU, TF32
    (:func:`_build`), so it takes as little of their time as it can."""
    dtype = run.autocast_dtype
    with torch.no_grad(), torch.autocast(run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        scores = score(transcribe_rows(run.unwrapped, processor, read_prepared_rows(dev_path), batch_size))
    return {"dev_wer": scores.wer, "dev_cer": scores.cer}


def data_parallel(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False):
    """``model`` wrapped in ``DistributedDataParallel`` on ``device`` (the process group is up).

    ``broadcast_buffers=False``: DDP would otherwise copy every buffer from rank 0 before each
    forward (each gate's temperature; for ump / two-stage the whole boolean masks, ~85 MB a step
    at base size), though every rank holds the same values: the masks never change, and the
    temperature follows the step count. ``find_unused_parameters``: for a model whose forward
    leaves some parameters out on some steps (layerdrop); every other run freezes what it never
    uses instead (:func:`pinch_ray.core.models.freeze_unused_parameters`), which costs nothing.
    """
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = device.type == "cuda"
    return DistributedDataParallel(model, device_ids=[device] if on_gpu else None,
                                   output_device=device if on_gpu else None, broadcast_buffers=False,
                                   find_unused_parameters=find_unused_parameters)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs each ``ray.train.report`` call of every worker at INFO ("Reporting training
    result 7: TrainingReport(...) from rank 0"), hundreds of lines a run on the driver's console
    beside the one progress line per report the driver prints itself; keep its warnings only."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that module: its logging stays as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # Ray names that logger by file


def _build(config: dict, train_cfg: TrainConfig, gate_cfg: GateConfig, rank: int, world: int):
    """This rank's :class:`Compressor` on its device, and the model's processor."""
    # transformers draws SpecAugment's time masks and layerdrop from numpy's global generator (and
    # torch's, which load_model seeds): unseeded, two runs of a trial trained different models. Each
    # rank its own masks. A resumed run draws them afresh from here, not where the checkpoint was.
    np.random.seed(train_cfg.seed + rank)
    if train_cfg.torch_threads:
        torch.set_num_threads(train_cfg.torch_threads)
    device = ray.train.torch.get_device()
    if device.type == "cuda":  # TF32 for what runs in float32 outside autocast (A100 and newer)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    overrides = dict(config["model_overrides"])
    if world > 1:
        # Skipped layers differ across ranks, and the sparsity term reaches a skipped layer's gated
        # weights outside the forward pass, which DDP's search for unused parameters cannot follow
        # (it would mark them ready twice): one pass of every layer on every rank.
        overrides["layerdrop"] = 0.0
    with storage.local_dir(config["init_from"]) as init_from:  # in an object store: a local copy
        path = checkpoint_path(str(init_from))  # a shipped foundation: checked against the code once
        model, processor = load_model(path, seed=train_cfg.seed, trust_remote_code=config["trust_remote_code"],
                                      **overrides)
        trained_head = has_trained_head(path)
    frozen = freeze_unused_parameters(model)  # before the optimizer and DDP see them
    if frozen:
        log.info("frozen, as the model's settings never use them in training: %s", ", ".join(frozen))
    run = Compressor.create(model, config["method"], config["target_sparsity"], train_cfg, gate_cfg,
                            device=device, target_basis=config["target_basis"],
                            use_attention_mask=processor.feature_extractor.return_attention_mask,
                            teacher_has_head=trained_head)
    return run, processor


def _resume(run: Compressor, rank: int) -> dict:
    """Load Ray Train's checkpoint into ``run`` if there is one; returns the data progress
    (``epoch``, ``batch_in_epoch``, ``elapsed_s``, ``resumed_at``: the steps it resumed at)."""
    progress = {"epoch": 0, "batch_in_epoch": 0, "elapsed_s": 0.0, "resumed_at": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return progress
    with checkpoint.as_directory() as directory:
        state = runs.load_checkpoint_state(directory, map_location=run.device)
    run.load_state_dict(state["compressor"])
    progress = state["progress"]
    progress["resumed_at"] = progress["resumed_at"] + [run.step_count]
    log.info("rank %d resumes at step %d (epoch %d)", rank, run.step_count, progress["epoch"])
    return progress


def _micro_batches(shard, train_cfg: TrainConfig, per_epoch: int, progress: dict, bucket_window_batches: int):
    """Endless ``(epoch, index in epoch, micro-batches of one step)``, epoch after epoch, from
    where ``progress`` stands (read once: the batches may be made ahead of the steps, see
    :func:`prefetch`); the caller records ``epoch`` / ``batch_in_epoch`` once the step is done."""
    epoch, skip = progress["epoch"], progress["batch_in_epoch"]
    while True:
        micro_batches = []
        batches = iter_train_batches(shard, train_cfg.batch_size, num_batches=per_epoch,
                                     seed=train_cfg.seed, epoch=epoch, bucket_window_batches=bucket_window_batches)
        for index, batch in enumerate(batches):
            if index < skip:
                continue  # resumed inside this epoch: these batches were trained on already
            micro_batches.append(batch)
            if len(micro_batches) == train_cfg.grad_accum_steps:
                yield epoch, index, micro_batches
                micro_batches = []
        epoch, skip = epoch + 1, 0


def _pinned(micro_batches: list[dict]) -> list[dict]:
    """The batches' tensors in page-locked memory, so the step's ``non_blocking`` copies to the
    GPU are asynchronous (from pageable memory they are not)."""
    return [{key: value.pin_memory() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            for batch in micro_batches]


def prefetch(items, count: int, depth: int = 2, pin: bool = False):
    """The first ``count`` of ``items`` (an iterator of ``(epoch, index, micro-batches)``), made by
    a background thread up to ``depth`` steps ahead: reading, bucketing and padding (and, with
    ``pin``, pinning) the next step's batches overlap the current step instead of following it.
    The thread never asks ``items`` for more than ``count`` (no epoch is started that no step
    needs); an error there is raised here, at the step that needed the item."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in itertools.islice(items, count):
                if pin:
                    item = (*item[:2], _pinned(item[2]))
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread
            ready.put(error)

    thread = threading.Thread(target=produce, name="pinch-ray-batches", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _Reporter:
    """What a worker does at a report: metrics to Ray Train (every rank; :class:`MetricsLog` logs
    them) and, every ``checkpoint_every`` steps and at the end, a checkpoint (rank 0). The final report calibrates
    first (sspg), so its figures describe the exported model, and writes the final checkpoint."""

    def __init__(self, config: dict, run: Compressor, processor, train_cfg: TrainConfig, rank: int, progress: dict):
        self.config, self.run, self.processor, self.train_cfg = config, run, processor, train_cfg
        self.rank, self.progress = rank, progress
        self.started = time.perf_counter() - progress["elapsed_s"]  # the clock goes on across resumes

    def due(self, step: int) -> bool:
        return (step >= self.train_cfg.max_steps or step % self.train_cfg.report_every == 0
                or step % self.train_cfg.checkpoint_every == 0)

    def report(self, metrics: dict, final: bool) -> None:
        run, step = self.run, self.run.step_count
        self.progress["elapsed_s"] = time.perf_counter() - self.started
        # every rank, before rank 0's calibration rescales its thresholds (it would look like drift)
        spread = _threshold_rank_spread(run)
        if final and self.rank == 0:
            metrics = {**metrics, **run.finish()}
        # hard_sparsity: on the target's basis, so progress lines compare it with the trial's target
        metrics = {**metrics, "hard_sparsity": run.on_basis(run.hard_sparsity()),
                   "elapsed_s": self.progress["elapsed_s"], "epoch": self.progress["epoch"],
                   "resumed_at": list(self.progress["resumed_at"]), "threshold_rank_spread": spread}
        eval_every = self.train_cfg.eval_every
        if self.rank == 0 and self.config["dev_path"] and eval_every and (final or step % eval_every == 0):
            metrics.update(_dev_scores(run, self.processor, self.config["dev_path"], self.train_cfg.eval_batch_size))
        if self.rank != 0 or not (final or step % self.train_cfg.checkpoint_every == 0):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            if final:
                runs.save_final(directory, run.model, self.processor, self._result(metrics))
            runs.save_checkpoint(directory, run.state_dict(), self.progress, self.config.get("settings"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=runs.checkpoint_name(step))

    def _result(self, metrics: dict) -> dict:
        """``train_result.json``: what the run is, what it achieved, the settings it ran with."""
        run = self.run
        return {"method": run.method, "target_sparsity": run.target_sparsity, "target_basis": run.target_basis,
                "seed": self.train_cfg.seed, "params_total": run.params_total, "params_gated": run.params_gated,
                "steps": run.step_count, "init_from": self.config["init_from"],
                "compression_seconds": self.progress["elapsed_s"], **metrics,
                "settings": self.config.get("settings")}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: train ``config["method"]`` (:func:`worker_config`) on this rank's shard of
    the ``train`` dataset, under DDP across ranks (gloo on CPU, nccl on GPU, set up by
    ``TorchTrainer``). Resumes from ``ray.train.get_checkpoint()`` (a restarted worker group or a
    rerun under the same run name): step, optimizers, thresholds, multiplier and data position
    continue where the checkpoint left them."""
    _quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train_cfg, gate_cfg = TrainConfig(**config["training"]), GateConfig(**config["gates"])
    run, processor = _build(config, train_cfg, gate_cfg, rank, world)
    progress = _resume(run, rank)
    if world > 1:
        run.model = data_parallel(run.model, run.device)
    per_epoch = batches_per_epoch(config["train_rows"], world, train_cfg.batch_size)
    if per_epoch < train_cfg.grad_accum_steps:
        raise ValueError(f"{config['train_rows']} training utterances give {per_epoch} batches of "
                         f"{train_cfg.batch_size} per worker, fewer than grad_accum_steps="
                         f"{train_cfg.grad_accum_steps}; lower training.batch_size or resources.num_workers")
    reporter = _Reporter(config, run, processor, train_cfg, rank, progress)
    steps = prefetch(_micro_batches(ray.train.get_dataset_shard("train"), train_cfg, per_epoch, progress,
                                    config["bucket_window_batches"]),
                     count=train_cfg.max_steps - run.step_count, pin=run.device.type == "cuda")
    trial = context.get_experiment_name()  # the run name: the trial's
    faults = debug.faults_for(trial, rank)
    trace = debug.StepTrace(trial, rank, ray.get_runtime_context().get_node_id())
    with contextlib.closing(steps):
        for epoch, index, micro_batches in steps:
            debug.maybe_fail(faults, run.step_count + 1, rank)
            trace.step(run.step_count + 1, epoch, index, micro_batches)
            metrics = run.step(micro_batches)  # its tensors reach the host when read: at a report only
            progress["epoch"], progress["batch_in_epoch"] = epoch, index + 1
            if reporter.due(run.step_count):
                reporter.report(metrics, final=run.step_count >= train_cfg.max_steps)


def progress_line(name: str, metrics: dict, max_steps: int) -> str:
    """One line of training progress: ``[sspg-0.65] step 200/900  ctc 0.84  sparsity 0.612  52 s, ~3 min left``."""
    step, elapsed = metrics.get("step", 0), metrics.get("elapsed_s", 0.0)
    parts = [f"[{name}] step {step}/{max_steps}", f"ctc {metrics['ctc_loss']:.3f}" if "ctc_loss" in metrics else ""]
    if metrics.get("hard_sparsity"):
        parts.append(f"sparsity {metrics['hard_sparsity']:.3f}")
    if "dev_wer" in metrics:
        parts.append(f"dev WER {metrics['dev_wer']:.3f}")
    parts.append(time_left(elapsed, step, max_steps) + ("" if step < max_steps else ", done"))
    return "  ".join(part for part in parts if part)


def time_left(elapsed: float, done: int, total: int) -> str:
    """``"52 s, ~3.1 min left"``: ``elapsed`` seconds for ``done`` of ``total``, the rest at the same pace."""
    left = elapsed / done * (total - done) if done else 0.0
    return f"{elapsed:.0f} s" + (f", ~{left / 60:.1f} min left" if done < total else "")


class MetricsLog(ray.train.UserCallback):
    """A Ray Train callback for rank 0's metrics of every report: appended to ``path`` (JSON lines),
    written as TensorBoard scalars under ``tensorboard_dir`` (``train/<metric>`` at the report's
    step), and, with ``name`` and ``max_steps``, printed as a :func:`progress_line` (shown by the
    driver). It runs in the Ray Train controller, so both paths must be writable there (the
    driver's machine for local runs; shared storage on a cluster)."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, max_steps: int | None = None,
                 tensorboard_dir: str | os.PathLike | None = None):
        self.path, self.name, self.max_steps = str(path), name, max_steps
        self.tensorboard_dir = str(tensorboard_dir) if tensorboard_dir else None
        self._events = None  # opened in the controller, on the first report (a file does not pickle)

    def __getstate__(self):
        return {**self.__dict__, "_events": None}

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0]
        with open(self.path, "a") as f:
            f.write(json.dumps(report, default=float) + "\n")
        if self.tensorboard_dir:
            self._write_events(report)
        if self.name and self.max_steps:
            print(progress_line(self.name, report, self.max_steps), flush=True)

    def _write_events(self, report: dict) -> None:
        """One TensorBoard event of the report's numbers, written and flushed before returning:
        tensorboardX's ``SummaryWriter`` writes from a thread of its own, and the controller may be
        gone before that thread writes the last report."""
        from tensorboardX.proto import event_pb2, summary_pb2
        from tensorboardX.record_writer import RecordWriter

        if self._events is None:
            os.makedirs(self.tensorboard_dir, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            self._events = RecordWriter(os.path.join(self.tensorboard_dir, name))
            self._events.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        values = [summary_pb2.Summary.Value(tag=f"train/{key}", simple_value=float(value))
                  for key, value in report.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
        event = event_pb2.Event(wall_time=time.time(), step=int(report.get("step", 0)),
                                summary=summary_pb2.Summary(value=values))
        self._events.write(event.SerializeToString())
        self._events.flush()


def tune_report_callback():
    """A Ray Train callback forwarding every report to the Tune trial it runs in (so Tune's results
    and the Ray dashboard show each trial's curves); None outside a Tune trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        return TuneReportCallback()
    except RuntimeError:  # not in a Tune session (the pipeline's dense baseline, the Python API)
        return None


def _ingest_config() -> ray.train.DataConfig:
    """Ray Train's data ingest, in a fixed order: every run (and a resumed one) streams each rank
    the same rows in the same order for the same seed and epoch, so a resume that skips the
    batches of its epoch already trained on skips exactly those (the split hands each block to the
    rank with fewest rows so far, which is deterministic once blocks come in order)."""
    # the driver's Ray Data options (as DataConfig.default_ingest_options, which passes the
    # deprecated exclude_resources on and so warns on every run), in order
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def resource_problems(resources: ResourcesConfig, cluster: dict[str, float]) -> list[str]:
    """Problems of running one training run of ``resources`` on ``cluster`` (Ray's
    ``cluster_resources()``: what is up), counting what an autoscaling cluster can grow to
    (``resources.cluster_max``, :meth:`ResourcesConfig.capacity`); [] when it fits."""
    problems = resources.problems()
    if problems:
        return problems
    capacity = resources.capacity(cluster)
    where = {key: f"the cluster can grow to ({amount:g}, resources.cluster_max.{key})"
             if resources.cluster_max.get(key, 0) > cluster.get(key, 0) else f"the cluster has ({amount:g})"
             for key, amount in capacity.items()}
    grow = "or, on an autoscaling cluster, set resources.cluster_max.{} to what it can grow to"
    workers = resources.num_workers
    if workers * resources.cpus_per_worker >= capacity["CPU"]:
        problems.append(f"resources: {workers} workers x {resources.cpus_per_worker:g} CPUs take every CPU "
                        f"{where['CPU']}, leaving none for Ray Data to stream the training data (the run would "
                        "hang); lower resources.cpus_per_worker (e.g. 0.5) or num_workers, " + grow.format("CPU"))
    gpus = workers * resources.gpus_per_worker
    if resources.use_gpu and workers > 1 and resources.gpus_per_worker < 1:
        problems.append(f"resources.gpus_per_worker: {resources.gpus_per_worker:g} with num_workers="
                        f"{workers} lets Ray put two ranks of one run on one GPU, where NCCL fails (\"Duplicate "
                        "GPU\"); set resources.gpus_per_worker=1, or num_workers=1 to share GPUs between trials")
    if resources.use_gpu and gpus > capacity["GPU"] + 1e-9:
        problems.append(f"resources: {workers} workers x {resources.gpus_per_worker:g} GPUs need {gpus:g} GPUs, "
                        f"more than {where['GPU']} (the run would wait forever); lower resources.num_workers or "
                        "gpus_per_worker, set resources.use_gpu=false, " + grow.format("GPU"))
    return problems


def run_training(config: dict, train_dataset, resources: ResourcesConfig, *, name: str,
                 storage_path: str, callbacks: list | None = None):
    """Run :func:`train_loop_per_worker` as a Ray Train ``TorchTrainer`` job; returns its Result.

    ``name`` + ``storage_path`` identify the run: rerunning the same pair resumes from its latest
    checkpoint. Ray must already be initialised (``ray.init()`` or a cluster address).

    Raises:
        ConfigError: bad resources, or a run the cluster cannot hold (:func:`resource_problems`).
        ray.train.TrainingFailedError: the run failed more than ``resources.max_failures`` times.
    """
    raise_if_problems(resource_problems(resources, ray.cluster_resources()), source="resources")
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        datasets={"train": train_dataset},
        dataset_config=_ingest_config(),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()
