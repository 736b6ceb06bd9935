"""The compression step: the methods (``dense``, ``ump``, ``two-stage``, ``sspg``, ``sspg-neuron``, and
the peers ``gmp``, ``movement``, ``parp`` of :mod:`pinch_ray.core.peers`) and :class:`Compressor`,
which trains a model under one of them.

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
from dataclasses import dataclass

import torch
from torch import nn

from pinch_ray.config import (DENSE, MAGNITUDE_METHODS, MAX_TARGET_SPARSITY, RANKED_METHODS, SSPG_METHODS,
                              ConfigError, GateConfig, TrainConfig, raise_if_problems, target_sparsity_problems)
from pinch_ray.core import gates as gates_lib
from pinch_ray.core import peers
from pinch_ray.core.masks import ThresholdGate
from pinch_ray.core.distill import Distiller
from pinch_ray.core.models import total_parameters

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
    tensor again, sspg's masked weight copies most of all (README, "Benchmarks"). With this,
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


# How to put more of a model under a method's gates or masks (the message of an unreachable target).
GATE_MORE = {
    "sspg": "gate more layers (gates.patterns; gates.gate_feature_encoder and gate_pos_conv, if off)",
    "sspg-neuron": "gate more kinds of units (gates.neuron_units)",
    **{method: f"give it more layers (gates.patterns: {method} prunes those alone, no conv layer)"
       for method in MAGNITUDE_METHODS + RANKED_METHODS},
}


def gated_target(target_sparsity: float, target_basis: str, params_total: int, params_gated: int,
                 method: str = "sspg") -> float:
    """The fraction of the gated parameters to remove so that ``target_sparsity`` of ``target_basis``
    is removed: ``target x params_total / params_gated`` for ``params``, the target itself for ``gated``.
    ``method``: the trial's, for the settings an unreachable target's message names.

    Raises:
        ConfigError: the gated share cannot reach the target (the largest reachable one is named).
    """
    if target_basis == "gated" or target_sparsity == 0:
        return float(target_sparsity)
    fraction = target_sparsity * params_total / params_gated
    if fraction > MAX_TARGET_SPARSITY:
        reachable = MAX_TARGET_SPARSITY * params_gated / params_total
        raise ConfigError([f"target_sparsity: {target_sparsity:g} of all {params_total:,} parameters cannot be "
                           f"removed: the gated layers hold {params_gated:,} ({params_gated / params_total:.1%}), "
                           f"so at most {reachable:.3f} is reachable; lower the target, or "
                           f"{GATE_MORE.get(method, GATE_MORE['sspg'])}"], source="method settings")
    return fraction


def prepare_method(model: nn.Module, method: str, target_sparsity: float, gate_cfg: GateConfig,
                   target_basis: str = "params") -> tuple[float, int, int]:
    """Make ``model`` ready for ``method``: attach gates (sspg), fixed masks (ump, two-stage), masks
    that training re-ranks (gmp, movement, parp: all ones until the first update) or nothing (dense).

    Returns ``(gated target, parameters of the model, parameters the gates act on)``: the gated
    target is the fraction of the gated parameters to remove (:func:`gated_target`); a neuron gate
    counts the parameters its units carry, a weight gate or ump mask its matrix.

    Raises:
        ConfigError: unknown method or basis, target outside [0, 0.99] or out of the gated layers'
            reach, bad gate settings or patterns.
    """
    raise_if_problems(target_sparsity_problems(method, target_sparsity, target_basis=target_basis),
                      source="method settings")
    params_total = total_parameters(model)
    gate_cfg = gate_cfg.for_method(method)
    if method in SSPG_METHODS:
        attached = gates_lib.attach_gates(model, gate_cfg)
        params_gated = sum(gate.numel for gate in attached.values())
    elif method in MAGNITUDE_METHODS + RANKED_METHODS:
        selected = gates_lib.select_modules(model, gate_cfg.all_patterns())
        params_gated = sum(m.weight.numel() for m in selected.values())
    else:
        return 0.0, params_total, 0
    target = gated_target(target_sparsity, target_basis, params_total, params_gated, method)
    if method in MAGNITUDE_METHODS:
        gates_lib.attach_uniform_masks(model, gate_cfg, target)
    elif method in RANKED_METHODS:
        gates_lib.check_not_gated(model)
        peers.attach_ranked_masks(model, method, selected)
    return target, params_total, params_gated


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


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number for all its parameters: the running mean square of
    every parameter's gradient. Each step is ``lr * m_i / sqrt(v)``, so parameters move in
    proportion to their own (averaged) gradients, at an overall speed Adam's normalisation fixes.

    For the gate thresholds (``GateConfig.threshold_update: shared``): per-parameter Adam moves
    each threshold ~``lr`` a step whatever its gradient, so every layer prunes at the same speed and
    the per-layer allocation cannot follow what pruning costs each layer.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            mean_square = torch.stack([p.grad.float().pow(2).mean() for p in params]).mean()
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros((), device=p.device))
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(mean_square, alpha=1 - beta2)  # the same in every state
                denominator = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** state["step"]))


def build_optimizers(model: nn.Module, cfg: TrainConfig,
                     gate_cfg: GateConfig) -> tuple[torch.optim.AdamW, torch.optim.Optimizer | None]:
    """The model weights' AdamW (groups ``weights`` and ``no_decay``: vectors and norms undecayed)
    and the thresholds' optimizer (None without gates): AdamW, or :class:`SharedScaleAdam` with
    ``gate_cfg.threshold_update: shared``, at ``effective_threshold_lr``, no decay. Movement scores
    belong to neither (:func:`pinch_ray.core.peers.accumulate_movement` steps them).

    The weights' AdamW is the fused implementation where torch has one for every parameter's device
    (CPU and CUDA): one kernel over all tensors instead of a Python loop over each.
    """
    threshold_ids = {id(g.threshold) for g in gates_lib.gates_of(model)}
    score_ids = {id(p) for p in peers.score_parameters(model)}
    groups = {"weights": [], "no_decay": [], "thresholds": []}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in score_ids:
            continue
        if id(param) in threshold_ids:
            groups["thresholds"].append(param)
        else:
            groups["no_decay" if _is_no_decay(name, param) else "weights"].append(param)
    param_groups = [
        {"name": "weights", "params": groups["weights"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for group in param_groups for p in group["params"])
    weights = torch.optim.AdamW(param_groups, betas=tuple(cfg.adam_betas), fused=fused or None)
    thresholds = None
    if groups["thresholds"]:
        group = [{"name": "thresholds", "params": groups["thresholds"], "lr": cfg.effective_threshold_lr}]
        thresholds = (SharedScaleAdam(group, lr=cfg.effective_threshold_lr, betas=tuple(cfg.adam_betas))
                      if gate_cfg.threshold_update == "shared"
                      else torch.optim.AdamW(group, betas=tuple(cfg.adam_betas), weight_decay=0.0))
    for optimizer in (weights, thresholds):
        for group in optimizer.param_groups if optimizer is not None else ():
            group["base_lr"] = group["lr"]
    return weights, thresholds


@dataclass
class Compressor:
    """Model + method + optimizer state; :meth:`step` runs one optimizer step.

    Build with :meth:`create`. ``model`` may be wrapped in DDP after creation (set
    ``compressor.model = ddp_model``); the gates and schedules act on the unwrapped module.
    ``target_sparsity`` is a fraction of ``target_basis`` (all parameters, or the gated ones);
    the objective, calibration and :meth:`hard_sparsity` work on the gated parameters, towards
    ``gated_target`` (:func:`prepare_method`).
    """

    model: nn.Module
    method: str
    target_sparsity: float
    train_cfg: TrainConfig
    gate_cfg: GateConfig
    optimizer: torch.optim.Optimizer  # the model weights
    threshold_optimizer: torch.optim.Optimizer | None  # the gate thresholds (None without gates)
    lagrangian: gates_lib.SparsityLagrangian | None
    target_basis: str = "params"
    params_total: int = 0  # parameters of the model before pruning
    params_gated: int = 0  # parameters the gates / masks act on
    sparsity_start: float = 0.0  # soft sparsity before training (sspg): where the target ramp starts
    step_count: int = 0  # optimizer steps done
    autocast_dtype: torch.dtype | None = None
    use_attention_mask: bool = True  # pass attention_mask to the model (False for group-norm wav2vec2-base)
    distiller: Distiller | None = None  # the starting model as teacher (training.distill_*), or None
    mask_schedule: peers.MaskSchedule | None = None  # gmp, movement, parp: when their masks are re-ranked

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
        target, params_total, params_gated = prepare_method(model, method, target_sparsity, gate_cfg, target_basis)
        model.to(device)
        mask_schedule = None
        if method in RANKED_METHODS:
            mask_schedule = peers.MaskSchedule(method, target, train_cfg.max_steps, gate_cfg)
            mask_schedule.start(model)
        lagrangian, sparsity_start = None, 0.0
        if method in SSPG_METHODS:
            lagrangian = gates_lib.SparsityLagrangian(gate_cfg.penalty).to(device)
            with torch.no_grad():
                sparsity_start = float(gates_lib.soft_sparsity(model))
        optimizer, threshold_optimizer = build_optimizers(model, train_cfg, gate_cfg)
        use_bf16 = device.type == "cuda" and train_cfg.bf16_autocast
        return cls(model=model, method=method, target_sparsity=target_sparsity, train_cfg=train_cfg,
                   gate_cfg=gate_cfg, optimizer=optimizer, threshold_optimizer=threshold_optimizer,
                   lagrangian=lagrangian, target_basis=target_basis, params_total=params_total,
                   params_gated=params_gated,
                   sparsity_start=sparsity_start, autocast_dtype=torch.bfloat16 if use_bf16 else None,
                   use_attention_mask=use_attention_mask, distiller=distiller, mask_schedule=mask_schedule)

    @property
    def gated_target(self) -> float:
        """The fraction of the gated parameters to remove (:func:`gated_target`)."""
        return gated_target(self.target_sparsity, self.target_basis, self.params_total, self.params_gated)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.threshold_optimizer] if self.threshold_optimizer is not None else [])

    @property
    def unwrapped(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    @property
    def device(self) -> torch.device:
        return next(self.unwrapped.parameters()).device

    def _set_schedules(self) -> dict:
        """Set lr, temperature for this step; returns them (and the current sparsity target)."""
        multiplier = lr_multiplier(self.step_count, self.train_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
        if self.threshold_optimizer is not None:  # their own schedule, or the weights'
            threshold_multiplier = 1.0 if self.gate_cfg.threshold_schedule == "constant" else multiplier
            for group in self.threshold_optimizer.param_groups:
                group["lr"] = group["base_lr"] * threshold_multiplier
        now = {"lr": multiplier * self.train_cfg.lr}
        if self.method in SSPG_METHODS:
            max_steps = self.train_cfg.max_steps
            now["tau"] = gates_lib.tau_at(self.step_count, max_steps, self.gate_cfg)
            now["target_now"] = gates_lib.target_at(self.step_count, max_steps, self.gated_target, self.gate_cfg,
                                                    start=self.sparsity_start)
            gates_lib.set_tau(self.unwrapped, now["tau"])
        return now

    def step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns its metrics.

        Metrics: ``step`` (after the update), ``ctc_loss`` (mean over micro-batches), ``lr``,
        ``grad_norm`` (of the weights, before clipping), ``seconds``; for sspg also ``sparsity_loss``,
        ``soft_sparsity``, ``target_now``, ``tau``, ``lambda_1``, ``threshold_grad_norm``; for gmp,
        movement and parp ``mask_sparsity`` (of the gated weights) at a step that re-ranked the
        masks; with distillation ``distill_logits`` and/or ``distill_hidden`` (unweighted).
        """
        started = time.perf_counter()
        self.model.train()
        now = self._set_schedules()
        sums = {}  # metric name -> running sum over micro-batches (tensors: one device sync at the end)
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
                if self.lagrangian is not None:
                    soft = gates_lib.soft_sparsity(self.unwrapped)
                    sparsity_loss = self.lagrangian(soft, now["target_now"])
                    loss = loss + sparsity_loss
                    for name, value in (("sparsity_loss", sparsity_loss), ("soft_sparsity", soft)):
                        sums[name] = sums.get(name, 0) + value.detach()
                (loss / n).backward()
                sums["ctc_loss"] = sums.get("ctc_loss", 0) + ctc_loss.detach()
        peers.accumulate_movement(self.unwrapped)  # movement scores: their own update, never clipped
        weight_norm, threshold_norm = self._clip_gradients()
        sums["grad_norm"] = weight_norm * n
        if threshold_norm is not None:
            sums["threshold_grad_norm"] = threshold_norm * n
        with self._masked_update():
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if self.lagrangian is not None:  # integral action once the target holds still (no windup on the ramp)
            ramping = now["target_now"] != self.gated_target
            self.lagrangian.ascend(0.0 if ramping else self.gate_cfg.lagrangian_gain / self.train_cfg.max_steps)
        self.step_count += 1
        if self.mask_schedule is not None:
            ranked_to = self.mask_schedule.after_step(self.unwrapped, self.step_count)
            if ranked_to is not None:
                now["mask_sparsity"] = ranked_to
        if self.lagrangian is not None:
            sums["lambda_1"] = self.lagrangian.lambda_1.detach() * n
        values = torch.stack([v.float() for v in sums.values()]).div(n).tolist()
        return {"step": self.step_count, **dict(zip(sums, values)), **now,
                "seconds": time.perf_counter() - started}

    def _clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip the weights' gradients to ``training.max_grad_norm``, their norm alone (counted in,
        the thresholds' gradients, which carry the sparsity term, shrank every weight's step while
        pruning happened), and the thresholds' apart to ``gates.threshold_max_grad_norm`` (0: not at
        all). Returns both norms before clipping (None: no thresholds)."""
        weights = [p for group in self.optimizer.param_groups for p in group["params"]]
        weight_norm = torch.nn.utils.clip_grad_norm_(weights, self.train_cfg.max_grad_norm)
        if self.threshold_optimizer is None:
            return weight_norm, None
        thresholds = [p for group in self.threshold_optimizer.param_groups for p in group["params"]
                      if p.grad is not None]
        limit = self.gate_cfg.threshold_max_grad_norm
        threshold_norm = (torch.nn.utils.clip_grad_norm_(thresholds, limit) if limit > 0
                          else torch.nn.utils.get_total_norm([p.grad for p in thresholds]))
        return weight_norm, threshold_norm

    @contextlib.contextmanager
    def _masked_update(self):
        """With ``gates.masked_update`` (sspg at weight granularity): each gated weight moves by its
        soft mask times the optimizer's update, ``W + M (W' - W)``, ``M`` taken before the step, so a
        weight under its threshold moves less whatever AdamW's normalisation makes of ``g * M``."""
        if not (self.gate_cfg.masked_update and self.method in SSPG_METHODS):
            yield
            return
        gated = [(module.parametrizations.weight.original, gate) for module, gate
                 in gates_lib.gated_modules(self.unwrapped).values()
                 if type(gate) is ThresholdGate and module.parametrizations.weight.is_tensor]
        with torch.no_grad():
            before = [(weight, weight.detach().clone(), gate.soft_mask(weight)) for weight, gate in gated]
        yield
        with torch.no_grad():
            for weight, old, mask in before:
                weight.copy_(torch.lerp(old, weight, mask.to(weight.dtype)))

    def hard_sparsity(self) -> float:
        """Measured hard-mask sparsity of the gated parameters (0.0 for dense)."""
        if self.method == DENSE:
            return 0.0
        return gates_lib.achieved_sparsity(self.unwrapped)

    def on_basis(self, gated_sparsity: float) -> float:
        """A sparsity of the gated parameters as a fraction of ``target_basis``."""
        if self.target_basis == "gated" or self.method == DENSE:
            return gated_sparsity
        return gated_sparsity * self.params_gated / self.params_total

    def finish(self) -> dict:
        """End of training: calibrate (sspg) if the hard sparsity misses the target; report both.

        ``achieved_sparsity`` / ``achieved_sparsity_trained`` are on ``target_basis`` (after / before
        calibration), ``gated_sparsity`` of the gated parameters (after).
        """
        trained = self.hard_sparsity()
        gated = trained
        if (self.method in SSPG_METHODS and self.gate_cfg.calibrate
                and abs(trained - self.gated_target) > self.gate_cfg.calibration_tolerance):
            _, gated = gates_lib.calibrate_thresholds(self.unwrapped, self.gated_target)
        elif self.mask_schedule is not None and abs(trained - self.gated_target) > 1e-4:
            # stopped before its schedule's last update (max_steps lowered, or a test): rank to the target
            peers.update_masks(self.unwrapped, self.gated_target, self.gate_cfg.mask_ranking)
            gated = self.hard_sparsity()
        return {"achieved_sparsity_trained": self.on_basis(trained), "achieved_sparsity": self.on_basis(gated),
                "gated_sparsity": gated, "calibrated": gated != trained}

    def state_dict(self) -> dict:
        """Everything needed to resume: model (with gates), multipliers, optimizer, step."""
        return {"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                "threshold_optimizer": self.threshold_optimizer.state_dict() if self.threshold_optimizer else None,
                "lagrangian": self.lagrangian.state_dict() if self.lagrangian is not None else None,
                "step": self.step_count, "sparsity_start": self.sparsity_start,
                "method": self.method, "target_sparsity": self.target_sparsity, "target_basis": self.target_basis}

    def load_state_dict(self, state: dict) -> None:
        saved = (state["method"], state["target_sparsity"], state.get("target_basis", "gated"))
        if saved != (self.method, self.target_sparsity, self.target_basis):
            raise ValueError(f"checkpoint is for {saved[0]}@{saved[1]} ({saved[2]}), "
                             f"not {self.method}@{self.target_sparsity} ({self.target_basis})")
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.threshold_optimizer is not None:
            self.threshold_optimizer.load_state_dict(state["threshold_optimizer"])
        if self.lagrangian is not None:
            self.lagrangian.load_state_dict(state["lagrangian"])
        self.step_count = int(state["step"])
        self.sparsity_start = float(state["sparsity_start"])
