"""Compression inside your own training code: :func:`attach` a method's gates or masks to a model,
add :meth:`Pinch.sparsity_loss` to the loss, call :meth:`Pinch.step` after each optimizer step, and
:meth:`Pinch.finalize` to a hard-pruned model stock transformers loads. A plain PyTorch loop::

    pinch = pinch_ray.attach(model, "sspg", target_sparsity=0.65, max_steps=2000)
    optimizer = torch.optim.AdamW(pinch.weight_parameters(), lr=1e-4)
    for batch in batches:  # {"input_values": [B, T] 16 kHz, "attention_mask": [B, T], "labels": [B, L]}
        loss = model(**batch).loss + pinch.sparsity_loss()
        loss.backward()
        optimizer.step()
        pinch.step()  # the thresholds' own optimizer, lambda_1, the schedules; before zero_grad
        optimizer.zero_grad()
    pinch.save_pretrained("out/model", processor)  # calibrated to the target, folded, stock format

The pipeline's :class:`pinch_ray.core.compressor.Compressor` (the Ray Train worker's step: the
weights' AdamW, clipping, learning-rate schedule, accumulation) trains through this class, and
:mod:`pinch_ray.hf` wraps it for ``transformers.Trainer``. Pure PyTorch, no Ray.

What :class:`Pinch` owns, per method (``max_steps`` sets every schedule's length):

- ``sspg``, ``sspg-neuron``: one learnable threshold per gated matrix (or unit kind), trained by
  their own optimizer (``gates.threshold_update``) at ``threshold_lr`` (default ``4 / max_steps``),
  their gradients clipped apart (``gates.threshold_max_grad_norm``); the sparsity Lagrangian whose
  target ramps from the starting soft sparsity to the target, ``lambda_1`` rising by gradient
  ascent once the ramp is over; the temperature annealed from ``tau_start`` to ``tau_end``; with
  ``gates.masked_update`` (weight granularity), each gated weight's update scaled by its soft mask:
  :meth:`Pinch.sparsity_loss` notes the weights and masks before your optimizer steps,
  :meth:`Pinch.step` scales what it did, so the loop stays as above.
- ``ump``, ``two-stage``: fixed magnitude masks, set at :func:`attach`; nothing to step.
- ``gmp``, ``movement``, ``parp``: masks re-ranked on the schedule of
  :class:`pinch_ray.core.peers.MaskSchedule`; movement's scores accumulate their own gradient.
- ``dense``: nothing (a no-op, so one script runs every method).

The thresholds and movement scores are parameters of the model (so ``model.state_dict()`` holds
them with the masks, and DDP averages their gradients) but not of your optimizer: build it over
:meth:`Pinch.weight_parameters`.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from pinch_ray.config import (DENSE, MAGNITUDE_METHODS, MAX_TARGET_SPARSITY, RANKED_METHODS, SSPG_METHODS,
                              ConfigError, GateConfig, TrainConfig, raise_if_problems, target_sparsity_problems)
from pinch_ray.core import export
from pinch_ray.core import gates as gates_lib
from pinch_ray.core import peers
from pinch_ray.core.models import total_parameters

log = logging.getLogger(__name__)

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


def threshold_optimizer(thresholds: list[nn.Parameter], lr: float, betas: tuple[float, float],
                        threshold_update: str) -> torch.optim.Optimizer:
    """The thresholds' optimizer: AdamW without decay (``adam``) or :class:`SharedScaleAdam`
    (``shared``), one group ``thresholds`` at ``lr``, which also records it as ``base_lr``."""
    group = [{"name": "thresholds", "params": thresholds, "lr": lr}]
    optimizer = (SharedScaleAdam(group, lr=lr, betas=tuple(betas)) if threshold_update == "shared"
                 else torch.optim.AdamW(group, betas=tuple(betas), weight_decay=0.0))
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the gates train themselves, in the model's order: the thresholds (sspg) and the
    movement scores; every other trainable parameter is a weight (:meth:`Pinch.weight_parameters`)."""
    own = {id(gate.threshold) for gate in gates_lib.gates_of(model)} | {id(p) for p in peers.score_parameters(model)}
    return [p for p in model.parameters() if id(p) in own]


class Pinch:
    """A method's gates or masks on one model, and everything that trains them: build it with
    :func:`attach`. See the module docstring for the loop; :attr:`step_count` counts
    :meth:`step` calls (optimizer steps), which the schedules follow.

    Attributes a loop may read: ``model`` (the module the gates sit on), ``method``,
    ``target_sparsity`` (a fraction of ``target_basis``: ``params``, all parameters, or ``gated``),
    ``gated_target`` (the fraction of the gated parameters that meets it), ``params_total``,
    ``params_gated``, ``max_steps``, ``step_count``, ``threshold_optimizer`` (None without
    thresholds), ``lagrangian`` (sspg), ``mask_schedule`` (gmp, movement, parp).
    """

    def __init__(self, model: nn.Module, method: str, target_sparsity: float, max_steps: int | None,
                 gate_cfg: GateConfig, target_basis: str, threshold_lr: float | None,
                 betas: tuple[float, float]):
        self.model, self.method, self.gate_cfg = model, method, gate_cfg
        self.target_sparsity, self.target_basis = float(target_sparsity), target_basis
        self.max_steps: int | None = None
        self.threshold_lr, self.betas = threshold_lr, tuple(betas)
        self.step_count = 0
        self.finished: dict | None = None  # finish()'s report, once it ran
        self.finalized = False
        self.gated_target, self.params_total, self.params_gated = prepare_method(
            model, method, target_sparsity, gate_cfg, target_basis)
        self.mask_schedule: peers.MaskSchedule | None = None
        if method in RANKED_METHODS:
            # parp's one-shot prune (and gmp's and movement's without a ramp) needs the ramp's
            # presence only, not its length: any max_steps >= 1 gives the same start
            peers.MaskSchedule(method, self.gated_target, max_steps or 1, gate_cfg).start(model)
        self.lagrangian: gates_lib.SparsityLagrangian | None = None
        self.sparsity_start = 0.0  # soft sparsity before training (sspg): where the target ramp starts
        if method in SSPG_METHODS:
            self.lagrangian = gates_lib.SparsityLagrangian(gate_cfg.penalty).to(self.device)
            with torch.no_grad():
                self.sparsity_start = float(gates_lib.soft_sparsity(model))
        threshold_ids = {id(gate.threshold) for gate in gates_lib.gates_of(model)}
        thresholds = [p for p in model.parameters() if p.requires_grad and id(p) in threshold_ids]
        self.threshold_optimizer: torch.optim.Optimizer | None = None
        if thresholds:  # its learning rate comes with max_steps
            self.threshold_optimizer = threshold_optimizer(thresholds, 0.0, self.betas, gate_cfg.threshold_update)
        self._sums: dict[str, torch.Tensor] = {}  # sparsity-term metrics summed over the step's micro-batches
        self._terms = 0  # sparsity_loss() calls since the last step
        # gates.masked_update: (weight, its value, its soft mask) before this step's update
        self._masked: list[gates_lib.MaskedUpdate] = []
        if max_steps is not None:
            self.set_max_steps(max_steps)

    # ------------------------------------------------------------------------------------------
    # What a training loop uses
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_max_steps(self, max_steps: int) -> None:
        """Fix the schedules' length (``attach(max_steps=None)`` left it open: :mod:`pinch_ray.hf`
        sets the Trainer's here). Before the first step only.

        Raises:
            ValueError: ``max_steps`` < 1, or steps were taken under another length.
        """
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps: must be a positive integer (got {max_steps!r}): the optimizer steps of "
                             "the whole run, which every schedule follows")
        if self.max_steps == max_steps:
            return
        if self.step_count:
            raise ValueError(f"max_steps: {self.step_count} steps were taken for a run of {self.max_steps}; "
                             f"the schedules cannot change length to {max_steps} now")
        self.max_steps = max_steps
        if self.method in RANKED_METHODS:
            self.mask_schedule = peers.MaskSchedule(self.method, self.gated_target, max_steps, self.gate_cfg)
        if self.threshold_optimizer is not None:
            lr = TrainConfig(max_steps=max_steps, threshold_lr=self.threshold_lr).effective_threshold_lr
            for group in self.threshold_optimizer.param_groups:
                group["lr"] = group["base_lr"] = lr
        self._set_tau()

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of the model but the gates' own (thresholds, movement scores):
        what your optimizer and your gradient clipping take, in the model's order."""
        own = {id(p) for p in gate_parameters(self.model)}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in own]

    @property
    def tau(self) -> float:
        """The gates' temperature at this step (sspg; relative to each layer's mean squared weight)."""
        return gates_lib.tau_at(self.step_count, self._steps(), self.gate_cfg)

    @property
    def target_now(self) -> float:
        """The sparsity target at this step (sspg: the ramp; of the gated parameters)."""
        return gates_lib.target_at(self.step_count, self._steps(), self.gated_target, self.gate_cfg,
                                   start=self.sparsity_start)

    def sparsity_loss(self) -> torch.Tensor:
        """The term to add to the loss, after each forward pass in training mode: the sparsity
        Lagrangian ``lambda_1 (s - s*) + penalty (s - s*)^2`` of the soft sparsity ``s`` that forward
        pass left (sspg); 0 for every other method. A 0-dim tensor on the model's device; add it
        outside autocast, once per micro-batch, and scale it as you scale the loss.
        """
        self._check_open()
        if self.lagrangian is None:
            return torch.zeros((), device=self.device)
        if self._terms == 0 and self.gate_cfg.masked_update:  # the step's first: the weights before its update
            self._masked = gates_lib.masked_update_start(self.model)
        soft = gates_lib.soft_sparsity(self.model)
        term = self.lagrangian(soft, self.target_now)
        for name, value in (("sparsity_loss", term), ("soft_sparsity", soft)):
            self._sums[name] = self._sums.get(name, 0) + value.detach()
        self._terms += 1
        return term

    def step(self, lr_scale: float = 1.0) -> dict:
        """After each optimizer step of the weights, before their gradients are cleared:
        :meth:`update_gates` then :meth:`advance`; returns both's metrics (tensors stay on the
        device). ``lr_scale``: the weights' learning rate now over its peak (your schedule's
        multiplier); the thresholds follow it (``gates.threshold_schedule: lr``, the default) or keep
        their rate (``constant``)."""
        return {**self.update_gates(lr_scale), **self.advance()}

    def update_gates(self, lr_scale: float = 1.0) -> dict:
        """The gates' own update from this step's gradients, then their gradients cleared: the
        movement scores accumulate theirs, the thresholds are clipped apart
        (``gates.threshold_max_grad_norm``) and stepped, ``lambda_1`` ascends once the target ramp is
        over. Independent of the weights' update, so a Trainer runs it before that (:mod:`pinch_ray.hf`).

        Returns tensors (no device sync): ``threshold_grad_norm`` (before clipping), ``lambda_1``,
        ``sparsity_loss`` and ``soft_sparsity`` (means over the step's micro-batches), and the floats
        ``tau`` and ``target_now`` of this step (sspg).

        Raises:
            RuntimeError: sspg's thresholds have no gradient (called before backward, or after
                ``zero_grad`` of the model).
        """
        self._check_open()
        self._steps()
        metrics: dict = {}
        peers.accumulate_movement(self.model)  # a plain step of 1, never clipped
        if self.threshold_optimizer is not None:
            thresholds = self._thresholds()
            if all(p.grad is None for p in thresholds):
                raise RuntimeError("the gate thresholds have no gradient: call pinch.step() after loss.backward() "
                                   "and before zero_grad (of the model, or an optimizer holding the thresholds; "
                                   "build yours over pinch.weight_parameters())")
            metrics["threshold_grad_norm"] = self.clip_gradients()
            scale = 1.0 if self.gate_cfg.threshold_schedule == "constant" else lr_scale
            for group in self.threshold_optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            self.threshold_optimizer.step()
            self.threshold_optimizer.zero_grad(set_to_none=True)
        if self.lagrangian is not None:
            # integral action once the target holds still (no windup while it ramps)
            ramping = self.target_now != self.gated_target
            self.lagrangian.ascend(0.0 if ramping else self.gate_cfg.lagrangian_gain / self.max_steps)
            terms = max(self._terms, 1)
            metrics.update({name: value / terms for name, value in self._sums.items()})
            metrics.update(lambda_1=self.lagrangian.lambda_1.detach().clone(), tau=self.tau,
                           target_now=self.target_now)
        self._sums, self._terms = {}, 0
        return metrics

    def advance(self) -> dict:
        """After the weights' optimizer step: scale its update by the soft masks
        (``gates.masked_update``), count the step and move the schedules on: the masks re-ranked
        when due (gmp, movement, parp; returns ``mask_sparsity``, the gated sparsity they were
        ranked to), the temperature of the next step (sspg)."""
        self._check_open()
        self._steps()
        gates_lib.masked_update_finish(self._masked)
        self._masked = []
        self.step_count += 1
        metrics = {}
        if self.mask_schedule is not None:
            ranked_to = self.mask_schedule.after_step(self.model, self.step_count)
            if ranked_to is not None:
                metrics["mask_sparsity"] = ranked_to
        self._set_tau()
        return metrics

    def clip_gradients(self) -> torch.Tensor | None:
        """Clip the thresholds' gradients to ``gates.threshold_max_grad_norm`` (0: not at all), their
        norm alone; returns it before clipping (None without thresholds). The weights are clipped
        apart (by your loop): clipped together, the thresholds' gradients, which carry the sparsity
        term, took most of the norm while pruning happened and shrank every weight's step."""
        if self.threshold_optimizer is None:
            return None
        thresholds = [p for p in self._thresholds() if p.grad is not None]
        limit = self.gate_cfg.threshold_max_grad_norm
        return (torch.nn.utils.clip_grad_norm_(thresholds, limit) if limit > 0
                else torch.nn.utils.get_total_norm([p.grad for p in thresholds]))

    # ------------------------------------------------------------------------------------------
    # Measuring, saving, resuming
    # ------------------------------------------------------------------------------------------

    def hard_sparsity(self) -> float:
        """Measured hard-mask sparsity of the gated parameters (0.0 for dense)."""
        if self.method == DENSE:
            return 0.0
        return gates_lib.achieved_sparsity(self.model)

    def on_basis(self, gated_sparsity: float) -> float:
        """A sparsity of the gated parameters as a fraction of ``target_basis``."""
        if self.target_basis == "gated" or self.method == DENSE:
            return gated_sparsity
        return gated_sparsity * self.params_gated / self.params_total

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model's own ``state_dict()`` (which holds the
        thresholds, masks and movement scores) and your optimizer's: the step, the thresholds'
        optimizer, ``lambda_1``, where the target ramp started, and what this run is."""
        return {"threshold_optimizer": self.threshold_optimizer.state_dict() if self.threshold_optimizer else None,
                "lagrangian": self.lagrangian.state_dict() if self.lagrangian is not None else None,
                "step": self.step_count, "sparsity_start": self.sparsity_start,
                "method": self.method, "target_sparsity": self.target_sparsity, "target_basis": self.target_basis}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (load the model's state too, before or after).

        Raises:
            ValueError: the state is of another method, target or basis.
        """
        saved = (state["method"], state["target_sparsity"], state.get("target_basis", "gated"))
        if saved != (self.method, self.target_sparsity, self.target_basis):
            raise ValueError(f"checkpoint is for {saved[0]}@{saved[1]} ({saved[2]}), "
                             f"not {self.method}@{self.target_sparsity} ({self.target_basis})")
        if self.threshold_optimizer is not None:
            self.threshold_optimizer.load_state_dict(state["threshold_optimizer"])
        if self.lagrangian is not None:
            self.lagrangian.load_state_dict(state["lagrangian"])
        self.step_count = int(state["step"])
        self.sparsity_start = float(state["sparsity_start"])
        # a step this Pinch was in when its loop stopped (an exception in the same process) is dropped
        self._sums, self._terms, self._masked = {}, 0, []
        self._set_tau()

    def finish(self) -> dict:
        """End of training: calibrate (sspg) if the hard sparsity misses the target by more than
        ``gates.calibration_tolerance``, or rank the masks to the target (gmp, movement, parp
        stopped before their last update); report both.

        Returns ``achieved_sparsity`` / ``achieved_sparsity_trained`` on ``target_basis`` (after /
        before calibration), ``gated_sparsity`` of the gated parameters (after), ``calibrated``.
        """
        trained = self.hard_sparsity()
        gated = trained
        if (self.method in SSPG_METHODS and self.gate_cfg.calibrate
                and abs(trained - self.gated_target) > self.gate_cfg.calibration_tolerance):
            _, gated = gates_lib.calibrate_thresholds(self.model, self.gated_target)
        elif self.method in RANKED_METHODS and abs(trained - self.gated_target) > 1e-4:
            peers.update_masks(self.model, self.gated_target, self.gate_cfg.mask_ranking)
            gated = self.hard_sparsity()
        self.finished = {"achieved_sparsity_trained": self.on_basis(trained), "achieved_sparsity": self.on_basis(gated),
                         "gated_sparsity": gated, "calibrated": gated != trained}
        return self.finished

    def finalize(self) -> nn.Module:
        """:meth:`finish` (if not yet), then fold every gate into the weights, in place: the model is
        again its own class (``Wav2Vec2ForCTC``, ...), the pruned weights zeros (or, for
        ``sspg-neuron``, the pruned units removed), no gate parameters. Returns the model, ready for
        ``save_pretrained`` (``sspg-neuron``: :meth:`save_pretrained`, which adds its loader)."""
        if self.finalized:
            return self.model
        report = self.finished or self.finish()
        gates_lib.fold(self.model)
        self.finalized = True
        log.info("%s: %.4f of %s parameters pruned (target %.4f)%s", self.method, report["achieved_sparsity"],
                 "all" if self.target_basis == "params" else "the gated", self.target_sparsity,
                 ", thresholds calibrated" if report["calibrated"] else "")
        return self.model

    def save_pretrained(self, directory: str | os.PathLike, processor=None) -> None:
        """:meth:`finalize` (if not yet), then write the model (safetensors) and ``processor`` (if
        given) into ``directory``: stock ``AutoModelForCTC.from_pretrained`` loads it (``sspg-neuron``:
        with ``trust_remote_code=True``; its loader is copied beside the weights). The compact copy:
        :func:`pinch_ray.core.export.save_compact` of this directory."""
        export.export_model(self.finalize(), processor, directory)

    # ------------------------------------------------------------------------------------------

    def _thresholds(self) -> list[nn.Parameter]:
        return [p for group in self.threshold_optimizer.param_groups for p in group["params"]]

    def _steps(self) -> int:
        if self.max_steps is None:
            raise ValueError("max_steps is not set: pass attach(..., max_steps=N), the optimizer steps of the "
                             "whole run (pinch_ray.hf sets a Trainer's)")
        return self.max_steps

    def _set_tau(self) -> None:
        if self.method in SSPG_METHODS and self.max_steps is not None:
            gates_lib.set_tau(self.model, self.tau)

    def _check_open(self) -> None:
        if self.finalized:
            raise RuntimeError("the gates were folded into the weights (finalize()); attach again to train more")


def attach(model: nn.Module, method: str, target_sparsity: float, max_steps: int | None = None, *,
           gates: GateConfig | None = None, target_basis: str = "params", threshold_lr: float | None = None,
           betas: tuple[float, float] = (0.9, 0.98)) -> Pinch:
    """Attach ``method``'s gates or masks to ``model`` (in place) for ``target_sparsity``, and return
    the :class:`Pinch` that trains them.

    ``model``: any ``*ForCTC`` (wav2vec2, HuBERT, WavLM) or ``nn.Module`` whose ``nn.Linear`` /
    ``nn.Conv1d`` names ``gates.patterns`` match, on the device it trains on. ``method``: ``sspg``,
    ``sspg-neuron``, ``ump``, ``two-stage`` (as ``ump`` on the model you pass), ``gmp``,
    ``movement``, ``parp`` or ``dense``. ``target_sparsity``: the fraction of ``target_basis`` to
    remove (``params``: all the model's parameters; ``gated``: those under the gates).
    ``max_steps``: optimizer steps of the whole run, the length of every schedule (None: set later
    with :meth:`Pinch.set_max_steps`; :mod:`pinch_ray.hf` takes the Trainer's). ``gates``: the
    method's settings (defaults: :class:`pinch_ray.config.GateConfig`). ``threshold_lr``: the
    thresholds' learning rate (None: ``4 / max_steps``); ``betas``: their Adam betas.

    Raises:
        ConfigError: every problem with the method, target, basis and settings at once, or a target
            the gated layers cannot reach (the largest reachable one is named).
        ValueError: ``model`` already carries gates.
    """
    gates = gates or GateConfig()
    problems = target_sparsity_problems(method, target_sparsity, target_basis=target_basis) + gates.problems()
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        problems.append(f"max_steps: must be a positive integer or None (got {max_steps!r})")
    if threshold_lr is not None and not threshold_lr > 0:
        problems.append(f"threshold_lr: must be > 0, or None for 4 / max_steps (got {threshold_lr!r})")
    raise_if_problems(problems, source="pinch_ray.attach")
    return Pinch(model, method, target_sparsity, max_steps, gates, target_basis, threshold_lr, betas)
