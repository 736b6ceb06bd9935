"""Training: the three methods (``dense``, ``ump``, ``sspg``) and the core training step.

Everything here runs in a plain Python process; the Ray Train worker wraps :class:`Compressor`.
One optimizer step = ``grad_accum_steps`` micro-batches of CTC loss (+ the sparsity Lagrangian for
``sspg``), gradient clipping, AdamW, the learning-rate schedule, and the temperature schedule.

A micro-batch is a dict of tensors: ``input_values`` [B, T] float32 (16 kHz audio),
``attention_mask`` [B, T] int64 (1 = real sample) and ``labels`` [B, L] int64 (padding = -100).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from pinch_ray import gates as gates_lib
from pinch_ray.config import GateConfig, TrainConfig, raise_if_problems, target_sparsity_problems

MODEL_KEYS = ("input_values", "attention_mask", "labels")


def prepare_method(model: nn.Module, method: str, target_sparsity: float, gate_cfg: GateConfig) -> None:
    """Make ``model`` ready for ``method``: attach gates (sspg), fixed masks (ump) or nothing (dense).

    Raises:
        ConfigError: unknown method, target outside [0, 0.99], bad gate settings or patterns.
    """
    raise_if_problems(target_sparsity_problems(method, target_sparsity), source="method settings")
    if method == "sspg":
        gates_lib.attach_gates(model, gate_cfg)
    elif method == "ump":
        gates_lib.attach_uniform_masks(model, gate_cfg, target_sparsity)


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


def build_optimizer(model: nn.Module, lagrangian: nn.Module | None, cfg: TrainConfig,
                    gate_cfg: GateConfig) -> torch.optim.AdamW:
    """AdamW with separate groups: decayed weights, undecayed vectors/norms, thresholds, multipliers.

    Group ``name`` keys: ``weights``, ``no_decay``, ``thresholds`` (``effective_threshold_lr``) and
    ``lagrangian`` (``lagrangian_lr``, gradient *ascent*, no schedule).
    """
    threshold_ids = {id(g.threshold) for g in gates_lib.gates_of(model)}
    groups = {"weights": [], "no_decay": [], "thresholds": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in threshold_ids:
            groups["thresholds"].append(param)
        else:
            groups["no_decay" if _is_no_decay(name, param) else "weights"].append(param)
    param_groups = [
        {"name": "weights", "params": groups["weights"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
        {"name": "thresholds", "params": groups["thresholds"], "lr": cfg.effective_threshold_lr, "weight_decay": 0.0},
    ]
    if lagrangian is not None:
        param_groups.append({"name": "lagrangian", "params": list(lagrangian.parameters()),
                             "lr": gate_cfg.lagrangian_lr, "weight_decay": 0.0, "maximize": True})
    param_groups = [g for g in param_groups if g["params"]]
    for group in param_groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(param_groups, betas=tuple(cfg.adam_betas))


@dataclass
class Compressor:
    """Model + method + optimizer state; :meth:`step` runs one optimizer step.

    Build with :meth:`create`. ``model`` may be wrapped in DDP after creation (set
    ``compressor.model = ddp_model``); the gates and schedules act on the unwrapped module.
    """

    model: nn.Module
    method: str
    target_sparsity: float
    train_cfg: TrainConfig
    gate_cfg: GateConfig
    optimizer: torch.optim.Optimizer
    lagrangian: gates_lib.SparsityLagrangian | None
    sparsity_start: float = 0.0  # soft sparsity before training (sspg): where the target ramp starts
    step_count: int = 0  # optimizer steps done
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def create(cls, model: nn.Module, method: str, target_sparsity: float, train_cfg: TrainConfig,
               gate_cfg: GateConfig, device: torch.device | str = "cpu") -> "Compressor":
        raise_if_problems(train_cfg.problems() + gate_cfg.problems(), source="training settings")
        device = torch.device(device)
        if train_cfg.freeze_feature_encoder and hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        prepare_method(model, method, target_sparsity, gate_cfg)
        model.to(device)
        lagrangian, sparsity_start = None, 0.0
        if method == "sspg":
            lagrangian = gates_lib.SparsityLagrangian(gate_cfg.penalty).to(device)
            with torch.no_grad():
                sparsity_start = float(gates_lib.soft_sparsity(model))
        optimizer = build_optimizer(model, lagrangian, train_cfg, gate_cfg)
        use_bf16 = device.type == "cuda" and train_cfg.bf16_autocast
        return cls(model=model, method=method, target_sparsity=target_sparsity, train_cfg=train_cfg,
                   gate_cfg=gate_cfg, optimizer=optimizer, lagrangian=lagrangian, sparsity_start=sparsity_start,
                   autocast_dtype=torch.bfloat16 if use_bf16 else None)

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
            if group["name"] != "lagrangian":
                group["lr"] = group["base_lr"] * multiplier
        now = {"lr": multiplier * self.train_cfg.lr}
        if self.method == "sspg":
            max_steps = self.train_cfg.max_steps
            now["tau"] = gates_lib.tau_at(self.step_count, max_steps, self.gate_cfg)
            now["target_now"] = gates_lib.target_at(self.step_count, max_steps, self.target_sparsity, self.gate_cfg,
                                                    start=self.sparsity_start)
            gates_lib.set_tau(self.unwrapped, now["tau"])
        return now

    def step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns its metrics.

        Metrics: ``step`` (after the update), ``ctc_loss`` (mean over micro-batches), ``lr``,
        ``grad_norm``, ``seconds``; for sspg also ``sparsity_loss``, ``soft_sparsity``,
        ``target_now``, ``tau``, ``lambda_1``.
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
                inputs = {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_KEYS if k in batch}
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    ctc_loss = self.model(**inputs).loss
                loss = ctc_loss
                if self.lagrangian is not None:
                    soft = gates_lib.soft_sparsity(self.unwrapped)
                    sparsity_loss = self.lagrangian(soft, now["target_now"])
                    loss = loss + sparsity_loss
                    for name, value in (("sparsity_loss", sparsity_loss), ("soft_sparsity", soft)):
                        sums[name] = sums.get(name, 0) + value.detach()
                (loss / n).backward()
                sums["ctc_loss"] = sums.get("ctc_loss", 0) + ctc_loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        sums["grad_norm"] = grad_norm * n
        if self.lagrangian is not None:
            sums["lambda_1"] = self.lagrangian.lambda_1.detach() * n
        values = torch.stack([v.float() for v in sums.values()]).div(n).tolist()
        return {"step": self.step_count, **dict(zip(sums, values)), **now,
                "seconds": time.perf_counter() - started}

    def hard_sparsity(self) -> float:
        """Measured hard-mask sparsity of the gated weights (0.0 for dense)."""
        if self.method == "dense":
            return 0.0
        return gates_lib.achieved_sparsity(self.unwrapped)

    def finish(self) -> dict:
        """End of training for sspg: calibrate if the hard sparsity misses the target; report both."""
        out = {"achieved_sparsity_trained": self.hard_sparsity()}
        out["achieved_sparsity"] = out["achieved_sparsity_trained"]
        if (self.method == "sspg" and self.gate_cfg.calibrate
                and abs(out["achieved_sparsity"] - self.target_sparsity) > self.gate_cfg.calibration_tolerance):
            _, out["achieved_sparsity"] = gates_lib.calibrate_thresholds(self.unwrapped, self.target_sparsity)
        out["calibrated"] = out["achieved_sparsity"] != out["achieved_sparsity_trained"]
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume: model (with gates), multipliers, optimizer, step."""
        return {"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lagrangian": self.lagrangian.state_dict() if self.lagrangian is not None else None,
                "step": self.step_count, "sparsity_start": self.sparsity_start,
                "method": self.method, "target_sparsity": self.target_sparsity}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method or state["target_sparsity"] != self.target_sparsity:
            raise ValueError(f"checkpoint is for {state['method']}@{state['target_sparsity']}, "
                             f"not {self.method}@{self.target_sparsity}")
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lagrangian is not None:
            self.lagrangian.load_state_dict(state["lagrangian"])
        self.step_count = int(state["step"])
        self.sparsity_start = float(state["sparsity_start"])
