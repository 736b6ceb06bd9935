"""The pipeline's compression step: :class:`Compressor` trains a model under one of the methods
(``dense``, ``ump``, ``two-stage``, ``sspg``, ``sspg-neuron``, and the peers ``gmp``, ``movement``,
``parp`` of :mod:`pinch_ray.core.peers`), whose gates, their optimizer and schedules it drives through
the public API, :class:`pinch_ray.core.pinch.Pinch`; it owns the rest of the loop.

Everything here runs in a plain Python process (no Ray); the Ray Train worker
(:mod:`pinch_ray.pipeline.worker`) wraps :class:`Compressor`.
One optimizer step = ``grad_accum_steps`` micro-batches of CTC loss (+ the sparsity Lagrangian for
``sspg``, + distillation from the starting model, :mod:`pinch_ray.core.distill`), gradient
clipping (the weights alone; the thresholds apart, ``gates.threshold_max_grad_norm``), AdamW, the
learning-rate schedule, the temperature schedule (sspg) and the mask schedule (the peers).

A micro-batch is a dict of tensors: ``input_values`` [B, T] float32 (16 kHz audio),
``attention_mask`` [B, T] int64 (1 = real sample) and ``labels`` [B, L] int64 (padding = -100).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pinch_ray.config import DENSE, GateConfig, TrainConfig, raise_if_problems
from pinch_ray.core import gates as gates_lib
from pinch_ray.core.distill import Distiller
# The methods' preparation and the thresholds' optimizer are the public API's (pinch_ray.attach);
# named here too, where the pipeline and its tests import them from.
from pinch_ray.core.pinch import (GATE_MORE, Pinch, SharedScaleAdam, gate_parameters, gated_target,  # noqa: F401
                                  prepare_method, threshold_optimizer)

log = logging.getLogger(__name__)

MODEL_KEYS = ("input_values", "attention_mask", "labels")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves every tensor above a few MB with a fresh ``mmap`` and gives the top of
    its heap back after every step, so each step page-faults (and the kernel zeroes) every large
    tensor again, sspg's masked weight copies most of all (docs/benchmarks.md). With this,
    tensors up to 32 MB come from the heap and freed memory stays mapped (what jemalloc/tcmalloc
    also do): the process keeps its peak footprint. Idempotent; a no-op returning False where the
    C library is not glibc.
    """
    ok = False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                      and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    except OSError:
        ok = False
    log.debug("glibc malloc keeps freed memory for reuse: %s", ok)
    return ok


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, hold, cosine decay to 0 over the last ``decay_fraction``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = cfg.max_steps * (1.0 - cfg.decay_fraction)
    if step < decay_start or cfg.decay_fraction == 0:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(cfg.max_steps - decay_start, 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    return param.dim() < 2 or "norm" in name.lower()


def weight_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The model weights' AdamW: groups ``weights`` and ``no_decay`` (vectors and norms undecayed),
    every trainable parameter but the gates' own (:func:`pinch_ray.core.pinch.gate_parameters`).

    The fused implementation where torch has one for every parameter's device (CPU and CUDA): one
    kernel over all tensors instead of a Python loop over each.
    """
    own = {id(p) for p in gate_parameters(model)}
    groups = {"weights": [], "no_decay": []}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in own:
            groups["no_decay" if _is_no_decay(name, param) else "weights"].append(param)
    param_groups = [
        {"name": "weights", "params": groups["weights"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for group in param_groups for p in group["params"])
    optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.adam_betas), fused=fused or None)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def build_optimizers(model: nn.Module, cfg: TrainConfig,
                     gate_cfg: GateConfig) -> tuple[torch.optim.AdamW, torch.optim.Optimizer | None]:
    """The weights' AdamW (:func:`weight_optimizer`) and the thresholds' optimizer as
    :class:`~pinch_ray.core.pinch.Pinch` builds it (None without gates): AdamW, or
    :class:`SharedScaleAdam` with ``gate_cfg.threshold_update: shared``, at
    ``effective_threshold_lr``, no decay. Movement scores belong to neither
    (:func:`pinch_ray.core.peers.accumulate_movement` steps them)."""
    threshold_ids = {id(g.threshold) for g in gates_lib.gates_of(model)}
    thresholds = [p for p in model.parameters() if p.requires_grad and id(p) in threshold_ids]
    return weight_optimizer(model, cfg), (threshold_optimizer(thresholds, cfg.effective_threshold_lr, cfg.adam_betas,
                                                              gate_cfg.threshold_update) if thresholds else None)


class StepMetrics(Mapping):
    """The metrics of one training step: numbers, and tensors that stay on the device until any value
    is read; then all of them come to the host at once (one device sync). A loop that reads a step's
    metrics only every ``report_every`` steps never waits for the device in between."""

    def __init__(self, values: dict):
        self._values, self._on_host = values, False

    def _to_host(self) -> None:
        if self._on_host:
            return
        keys = [key for key, value in self._values.items() if isinstance(value, torch.Tensor)]
        if keys:
            numbers = torch.stack([self._values[key].detach().float().reshape(()) for key in keys]).tolist()
            self._values.update(zip(keys, numbers))
        self._on_host = True

    def __getitem__(self, key: str):
        self._to_host()
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        self._to_host()
        return f"StepMetrics({self._values})"


@dataclass
class Compressor:
    """Model + method + optimizer state; :meth:`step` runs one optimizer step.

    Build with :meth:`create`. The method's gates, their optimizer and schedules are a
    :class:`~pinch_ray.core.pinch.Pinch` (``pinch``, the public API every caller of the gates uses);
    the Compressor adds what the pipeline's loop owns: the weights' AdamW, their clipping and
    learning-rate schedule, gradient accumulation, autocast and distillation. ``model`` may be
    wrapped in DDP after creation (set ``compressor.model = ddp_model``); the gates and schedules
    act on the unwrapped module. ``target_sparsity`` is a fraction of ``target_basis`` (all
    parameters, or the gated ones); the objective, calibration and :meth:`hard_sparsity` work on
    the gated parameters, towards ``gated_target``.
    """

    model: nn.Module
    pinch: Pinch  # the method's gates or masks on the unwrapped model, their optimizer and schedules
    train_cfg: TrainConfig
    optimizer: torch.optim.Optimizer  # the model weights
    autocast_dtype: torch.dtype | None = None
    use_attention_mask: bool = True  # pass attention_mask to the model (False for group-norm wav2vec2-base)
    distiller: Distiller | None = None  # the starting model as teacher (training.distill_*), or None

    @classmethod
    def create(cls, model: nn.Module, method: str, target_sparsity: float, train_cfg: TrainConfig,
               gate_cfg: GateConfig, device: torch.device | str = "cpu",
               use_attention_mask: bool = True, target_basis: str = "params",
               teacher_has_head: bool = True) -> "Compressor":
        """``teacher_has_head``: ``model``'s CTC head was trained (not new on an SSL checkpoint), so
        ``training.distill_logits`` can use its outputs. The dense method is never distilled: the
        reference is plain fine-tuning, whatever the compression trials use."""
        raise_if_problems(train_cfg.problems() + gate_cfg.problems(), source="training settings")
        device = torch.device(device)
        if device.type == "cpu":
            keep_freed_cpu_memory()
        if train_cfg.freeze_feature_encoder and hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        distiller = None
        if method != DENSE:  # the teacher: the model as the trial starts, before any gate goes in
            distiller = Distiller.create(model, train_cfg.distill_logits, train_cfg.distill_hidden,
                                         train_cfg.distill_layers, train_cfg.distill_temperature, teacher_has_head)
            if distiller is not None:
                distiller.teacher.to(device)
        model.to(device)
        pinch = Pinch(model, method, target_sparsity, train_cfg.max_steps, gate_cfg, target_basis,
                      train_cfg.threshold_lr, train_cfg.adam_betas)
        use_bf16 = device.type == "cuda" and train_cfg.bf16_autocast
        return cls(model=model, pinch=pinch, train_cfg=train_cfg, optimizer=weight_optimizer(model, train_cfg),
                   autocast_dtype=torch.bfloat16 if use_bf16 else None, use_attention_mask=use_attention_mask,
                   distiller=distiller)

    # What the run is and where its method stands: the Pinch's.
    method = property(lambda self: self.pinch.method)
    target_sparsity = property(lambda self: self.pinch.target_sparsity)
    target_basis = property(lambda self: self.pinch.target_basis)
    params_total = property(lambda self: self.pinch.params_total)  # parameters of the model before pruning
    params_gated = property(lambda self: self.pinch.params_gated)  # parameters the gates / masks act on
    gated_target = property(lambda self: self.pinch.gated_target)  # the fraction of the gated parameters to remove
    sparsity_start = property(lambda self: self.pinch.sparsity_start)  # soft sparsity before training (sspg)
    step_count = property(lambda self: self.pinch.step_count)  # optimizer steps done
    lagrangian = property(lambda self: self.pinch.lagrangian)
    mask_schedule = property(lambda self: self.pinch.mask_schedule)  # gmp, movement, parp

    @property
    def gate_cfg(self) -> GateConfig:
        return self.pinch.gate_cfg

    @gate_cfg.setter
    def gate_cfg(self, value: GateConfig) -> None:
        self.pinch.gate_cfg = value

    @property
    def threshold_optimizer(self) -> torch.optim.Optimizer | None:
        """The gate thresholds' optimizer (None without gates): the Pinch's."""
        return self.pinch.threshold_optimizer

    @threshold_optimizer.setter
    def threshold_optimizer(self, value: torch.optim.Optimizer | None) -> None:
        self.pinch.threshold_optimizer = value

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.threshold_optimizer] if self.threshold_optimizer is not None else [])

    @property
    def unwrapped(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    @property
    def device(self) -> torch.device:
        return next(self.unwrapped.parameters()).device

    def step(self, micro_batches: list[dict]) -> StepMetrics:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns its metrics,
        which come to the host (one device sync) when a value is first read (:class:`StepMetrics`).

        Metrics: ``step`` (after the update), ``ctc_loss`` (mean over micro-batches), ``lr``,
        ``grad_norm`` (of the weights, before clipping), ``seconds`` (host time: on a GPU the device
        may still be running the step); for sspg also ``sparsity_loss``, ``soft_sparsity``,
        ``target_now``, ``tau``, ``lambda_1``, ``threshold_grad_norm``; for gmp, movement and parp
        ``mask_sparsity`` (of the gated weights) at a step that re-ranked the masks; with
        distillation ``distill_logits`` and/or ``distill_hidden`` (unweighted).
        """
        started = time.perf_counter()
        self.model.train()
        multiplier = lr_multiplier(self.step_count, self.train_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
        sums = {}  # metric name -> running sum over micro-batches (tensors: no device sync)
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                keys = MODEL_KEYS if self.use_attention_mask else ("input_values", "labels")
                inputs = {k: batch[k].to(self.device, non_blocking=True) for k in keys if k in batch}
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    hidden = self.distiller is not None and self.distiller.wants_hidden_states
                    out = self.model(**inputs, output_hidden_states=hidden)
                    ctc_loss = out.loss
                    loss = ctc_loss
                    if self.distiller is not None:
                        distill_loss, terms = self.distiller.loss(out, inputs)
                        loss = loss + distill_loss
                        for name, value in terms.items():
                            sums[name] = sums.get(name, 0) + value
                loss = loss + self.pinch.sparsity_loss()
                (loss / n).backward()
                sums["ctc_loss"] = sums.get("ctc_loss", 0) + ctc_loss.detach()
        metrics = {"step": self.step_count + 1, **{name: value / n for name, value in sums.items()},
                   "lr": multiplier * self.train_cfg.lr, "grad_norm": self._clip_weights()}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update(self.pinch.step(lr_scale=multiplier))
        return StepMetrics({**metrics, "seconds": time.perf_counter() - started})

    def _clip_weights(self) -> torch.Tensor:
        """Clip the weights' gradients to ``training.max_grad_norm``, their norm alone (the thresholds
        are clipped apart: :meth:`Pinch.clip_gradients`); returns it before clipping."""
        weights = [p for group in self.optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(weights, self.train_cfg.max_grad_norm)

    def _clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both clippings of a step, the weights' and the thresholds' (None: no thresholds); returns
        both norms before clipping."""
        return self._clip_weights(), self.pinch.clip_gradients()

    def hard_sparsity(self) -> float:
        """Measured hard-mask sparsity of the gated parameters (0.0 for dense)."""
        return self.pinch.hard_sparsity()

    def on_basis(self, gated_sparsity: float) -> float:
        """A sparsity of the gated parameters as a fraction of ``target_basis``."""
        return self.pinch.on_basis(gated_sparsity)

    def finish(self) -> dict:
        """End of training: :meth:`Pinch.finish` (calibrate sspg if the hard sparsity misses the
        target; rank the peers' masks to it); ``achieved_sparsity`` / ``achieved_sparsity_trained``
        on ``target_basis`` (after / before calibration), ``gated_sparsity`` of the gated parameters."""
        return self.pinch.finish()

    def state_dict(self) -> dict:
        """Everything needed to resume: model (with gates), the weights' optimizer, and the Pinch's
        state (thresholds' optimizer, multiplier, step, what the run is)."""
        return {"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                **self.pinch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`.

        Raises:
            ValueError: the state is of another method, target or basis (before anything is loaded).
        """
        self.pinch.load_state_dict(state)
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
