"""Sparsity-aware self-pinching gates (SSPG) and the uniform-magnitude-pruning baseline.

Pure PyTorch; works on any model built from ``nn.Linear`` / ``nn.Conv1d`` (Hugging Face wav2vec2,
HuBERT, WavLM, ...). Method: Xu et al., Interspeech 2025, arXiv 2505.22608.

Every gated weight matrix ``W_l`` gets ONE learnable scalar, its threshold. While training, the
forward pass uses ``W_l * M_l`` with the soft mask

    M_l = sigmoid((W_l^2 - t_l^2) / (2 tau_l))          (elementwise)

so gradients reach both ``W_l`` and ``t_l``; weights under the threshold pinch themselves off while
the rest keep learning. After training the hard mask is ``|W_l| > t_l``. (The sigmoid's argument
is clamped to [-20, 20] so no value is a denormal float; see :func:`_mask_from_squares`.)

Scale normalisation (our choice, documented here): weights of different layers live on different
scales, so threshold and temperature are expressed relative to the layer's own scale
``s_l = mean(W_l^2)`` (recomputed at every forward pass, treated as a constant for gradients):

    t_l   = threshold_l * sqrt(s_l)      (``threshold_l`` is the learnable scalar, unitless)
    tau_l = tau * s_l                    (``tau`` is global and annealed, see below)

With that, one learning rate and one temperature fit every layer, and Adam moves each threshold in
units of its layer's RMS weight. The temperature is annealed geometrically from
``GateConfig.tau_start`` to ``GateConfig.tau_end`` (:func:`tau_at`), so the soft mask approaches
the hard step the model is finally pruned with.

Sparsity-aware objective: the parameter-weighted soft sparsity over all gated weights,
``s_soft = 1 - sum_l sum(M_l) / sum_l numel(W_l)``, is driven to the target with
``lambda_1 (s_soft - s*) + penalty (s_soft - s*)^2``: a Lagrange multiplier trained by gradient
*ascent* (as in CoFi / DPHuBERT) plus a fixed quadratic penalty (:class:`SparsityLagrangian`). The
target eases from the initial soft sparsity to ``s*`` over the first part of training
(:func:`target_at`). Because the thresholds are per layer and the constraint is global, layers end
with different sparsity.

Gates are attached as ``torch.nn.utils.parametrize`` parametrizations of ``weight``
(:mod:`pinch_ray.core.masks`: the gate protocol and the fused kernel; unit gates in
:mod:`pinch_ray.core.neurons`): a module in ``train()`` mode uses the soft mask, in ``eval()`` mode
the hard mask (so evaluation always shows the pruned model); :func:`gate_mode` overrides that.
:func:`fold` removes every gate and returns the same model class with masked weights zeroed — what
``save_pretrained`` then writes. This module holds the operations on a whole model; it never asks
which kind a gate is.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from pinch_ray.config import ConfigError, GateConfig
from pinch_ray.core import pruned_modeling
from pinch_ray.core.masks import WEIGHT, FixedMask, Gate, ThresholdGate, unmasked_weight
from pinch_ray.core.neurons import attach_neuron_gates

GATEABLE_TYPES = (nn.Linear, nn.Conv1d)

# ----------------------------------------------------------------------------------------------
# Choosing, attaching, inspecting
# ----------------------------------------------------------------------------------------------


def select_modules(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """Modules (``nn.Linear`` / ``nn.Conv1d``) whose full dotted name matches a pattern.

    Raises:
        ConfigError: a pattern is not a valid regex or matches no gateable module, or nothing at
            all is selected. Every problem is listed, each naming ``gates.patterns[i]``.
    """
    problems, selected = [], {}
    for i, pattern in enumerate(patterns):
        try:
            regex = re.compile(pattern)
        except re.error as err:
            problems.append(f"gates.patterns[{i}]: {pattern!r} is not a regular expression ({err})")
            continue
        hits = {name: m for name, m in model.named_modules()
                if regex.fullmatch(name) and isinstance(m, GATEABLE_TYPES)}
        if not hits:
            problems.append(f"gates.patterns[{i}]: {pattern!r} matches no nn.Linear/nn.Conv1d module "
                            f"of {type(model).__name__}; check the module names (model.named_modules())")
        selected.update(hits)
    if not selected and not problems:
        problems.append(f"gates.patterns: nothing to gate in {type(model).__name__}")
    if problems:
        raise ConfigError(problems, source="gate settings")
    return selected


def check_not_gated(model: nn.Module) -> None:
    if gated_modules(model):
        raise ValueError("the model already carries gates or masks; fold() it before attaching new ones")


def attach_gates(model: nn.Module, cfg: GateConfig) -> dict[str, ThresholdGate]:
    """Give every selected weight a :class:`ThresholdGate` (``cfg.granularity == "weight"``), or every
    feed-forward / attention module a ``NeuronGate`` (``"neuron"``, see :mod:`pinch_ray.core.neurons`);
    returns them by the name of the module whose weight they parametrize. With ``cfg.shared_threshold``
    every gate holds the same threshold Parameter."""
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems, source="gate settings")
    check_not_gated(model)
    if cfg.granularity == "neuron":
        gates = attach_neuron_gates(model, list(cfg.neuron_units), cfg.threshold_init, cfg.tau_start,
                                    noise=cfg.unit_noise)
    else:
        gates = {}
        for name, module in select_modules(model, cfg.all_patterns()).items():
            gate = ThresholdGate(cfg.threshold_init, cfg.tau_start, module.weight.numel(),
                                 regrow=cfg.regrow).to(module.weight.device)
            parametrize.register_parametrization(module, "weight", gate, unsafe=True)
            gates[name] = gate
    if cfg.shared_threshold:  # one Parameter object in every gate: one gradient, one optimizer entry
        shared = next(iter(gates.values())).threshold
        for gate in gates.values():
            gate.threshold = shared
    return gates


def attach_uniform_masks(model: nn.Module, cfg: GateConfig, target_sparsity: float) -> dict[str, FixedMask]:
    """The ``ump`` baseline: prune every matrix ``cfg.patterns`` select (no conv layer: see
    ``GateConfig.for_method``) to the same fraction by ``|W|``.

    Exactly ``round(target_sparsity * numel)`` weights (the smallest in magnitude) are masked in
    each matrix; the mask then stays fixed while the rest fine-tune.
    """
    check_not_gated(model)
    masks = {}
    for name, module in select_modules(model, cfg.for_method("ump").all_patterns()).items():
        weight = module.weight.detach()
        num_pruned = round(target_sparsity * weight.numel())
        mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[weight.abs().flatten().argsort()[:num_pruned]] = False
        masks[name] = FixedMask(mask.view_as(weight))
        parametrize.register_parametrization(module, "weight", masks[name], unsafe=True)
    return masks


def gated_modules(model: nn.Module) -> dict[str, tuple[nn.Module, Gate]]:
    """Every module whose ``weight`` carries a gate or fixed mask: ``{name: (module, gate)}``."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            last = module.parametrizations.weight[-1]
            if isinstance(last, Gate):
                found[name] = (module, last)
    return found


def gates_of(model: nn.Module) -> list[ThresholdGate]:
    """The :class:`ThresholdGate` s of a model (DDP-wrapped or not), in module order."""
    return [g for _, g in gated_modules(model).values() if isinstance(g, ThresholdGate)]


def module_hard_mask(module: nn.Module) -> torch.Tensor:
    """The hard (final) mask of one gated module: bool, shaped like its weight."""
    return module.parametrizations.weight[-1].weight_hard_mask(unmasked_weight(module))


@contextlib.contextmanager
def gate_mode(model: nn.Module, mode: str):
    """Force every gate to ``"soft"`` or ``"hard"`` masks inside the block, whatever train/eval."""
    if mode not in ("soft", "hard"):
        raise ValueError(f"gate mode must be 'soft' or 'hard', not {mode!r}")
    gates = gates_of(model)
    previous = [g.mode for g in gates]
    for g in gates:
        g.mode = mode
    try:
        yield
    finally:
        for g, p in zip(gates, previous):
            g.mode = p


# ----------------------------------------------------------------------------------------------
# Sparsity: soft (differentiable), hard (measured), per layer
# ----------------------------------------------------------------------------------------------


def soft_sparsity(model: nn.Module) -> torch.Tensor:
    """Differentiable parameter-weighted soft sparsity ``1 - sum(M) / N`` over all gated weights.

    Uses the mask sums recorded by the latest soft forward pass (no extra pass over the weights);
    a gate that was not used in that pass (e.g. layer drop) is evaluated on the spot. Each recorded
    sum is consumed, so it is never reused across steps.
    """
    kept, total = [], 0
    for module, gate in gated_modules(model).values():
        if not isinstance(gate, ThresholdGate):
            continue
        if gate.last_mask_sum is None:
            gate.last_mask_sum = gate.fresh_mask_sum(module)
        kept.append(gate.last_mask_sum)
        total += gate.numel
        gate.last_mask_sum = None
    if total == 0:
        raise ValueError("soft_sparsity: the model has no ThresholdGate; attach_gates() first")
    return 1.0 - torch.stack(kept).sum() / total


@dataclass
class MaskedUpdate:
    """One gated weight before an optimizer step (``gates.masked_update``): the parameter, its value
    and its soft mask then."""
    weight: nn.Parameter
    before: torch.Tensor
    mask: torch.Tensor


@torch.no_grad()
def masked_update_start(model: nn.Module) -> list[MaskedUpdate]:
    """Before an optimizer step: every weight-granularity gate's weight, its value and soft mask
    (the mask of the thresholds and temperature the step's forward passes use), outside autocast.
    Neuron gates and weights under another parametrization (the weight-normed positional conv) are
    left out: their update is the optimizer's."""
    noted = []
    with torch.autocast(next(model.parameters()).device.type, enabled=False):
        for module, gate in gated_modules(model).values():
            if type(gate) is ThresholdGate and module.parametrizations.weight.is_tensor:
                weight = module.parametrizations.weight.original
                noted.append(MaskedUpdate(weight, weight.detach().clone(), gate.soft_mask(weight)))
    return noted


@torch.no_grad()
def masked_update_finish(noted: list[MaskedUpdate]) -> None:
    """After the optimizer step: each weight moves by its soft mask times what the optimizer did,
    ``W + M (W' - W)``, so a weight under its threshold moves less whatever AdamW's normalisation
    made of its masked gradient ``g * M``."""
    for item in noted:
        item.weight.copy_(torch.lerp(item.before, item.weight, item.mask))


@dataclass
class LayerSparsity:
    name: str
    numel: int
    pruned: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel


@torch.no_grad()
def layer_sparsity(model: nn.Module) -> list[LayerSparsity]:
    """Hard-mask sparsity of every gated matrix (or, for neuron gates, of the parameters the units
    carry), measured (not the configured value)."""
    return [LayerSparsity(name, *gate.hard_counts(module)) for name, (module, gate) in gated_modules(model).items()]


def achieved_sparsity(model: nn.Module) -> float:
    """Fraction of gated weights that the hard masks remove (parameter-weighted)."""
    layers = layer_sparsity(model)
    if not layers:
        raise ValueError("achieved_sparsity: the model has no gates or masks")
    return sum(l.pruned for l in layers) / sum(l.numel for l in layers)


# ----------------------------------------------------------------------------------------------
# Schedules and the objective
# ----------------------------------------------------------------------------------------------


def tau_at(step: int, max_steps: int, cfg: GateConfig) -> float:
    """Relative temperature at ``step``: geometric from ``tau_start`` to ``tau_end``."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** progress


def target_at(step: int, max_steps: int, target_sparsity: float, cfg: GateConfig, start: float = 0.0) -> float:
    """Sparsity target at ``step``: from ``start`` (the initial soft sparsity) to ``target_sparsity``
    over ``target_warmup_fraction`` of training, easing out (a quarter sine), then constant.

    Pruning is a ratchet (weights pushed under the threshold stop receiving CTC gradient), so the
    target is approached from below and slowly at the end, leaving nothing to overshoot.
    """
    ramp_steps = cfg.target_warmup_fraction * max_steps
    if ramp_steps <= 0 or start >= target_sparsity:
        return target_sparsity
    if step >= ramp_steps:
        return target_sparsity  # exactly: the objective's integral action starts when the ramp is over
    return start + (target_sparsity - start) * math.sin(step / ramp_steps * math.pi / 2)


def set_tau(model: nn.Module, tau: float) -> None:
    for gate in gates_of(model):
        gate.tau.fill_(float(tau))


class SparsityLagrangian(nn.Module):
    """``lambda_1 (s - s*) + penalty (s - s*)^2``; ``lambda_1`` rises by :meth:`ascend` after backward.

    ``lambda_1`` is a Lagrange multiplier trained by gradient ascent (integral action: it grows
    while the constraint is violated); the fixed quadratic ``penalty`` reacts at once to a gap
    (proportional action) and damps the oscillation a learned quadratic multiplier (CoFi) shows on
    short runs. The multiplier is objective state, not a model parameter: it is identical on every
    DDP rank because its gradient depends only on the (synchronised) thresholds and weights.
    """

    def __init__(self, penalty: float):
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.register_buffer("penalty", torch.tensor(float(penalty)))

    def forward(self, soft_sparsity: torch.Tensor, target: float) -> torch.Tensor:
        gap = soft_sparsity - target
        return self.lambda_1 * gap + self.penalty * gap * gap

    @torch.no_grad()
    def ascend(self, step_size: float) -> None:
        """``lambda_1 += step_size * gap`` (its gradient, the gap, accumulated by backward); clears it.

        Plain gradient ascent, not Adam: the multiplier moves in proportion to the constraint's
        violation (integral action), where Adam would move it by ~its learning rate every step
        whatever the gap, and so wind up over a long run.
        """
        if self.lambda_1.grad is not None:
            self.lambda_1.add_(self.lambda_1.grad, alpha=step_size)
            self.lambda_1.grad = None


# ----------------------------------------------------------------------------------------------
# After training: calibrate, fold
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, target_sparsity: float, iterations: int = 60) -> tuple[float, float]:
    """Rescale every threshold by one common factor so the hard sparsity meets the target.

    Keeps the learned mixture of per-layer sparsities (all thresholds scale together) and finds the
    factor by bisection. Returns ``(achieved_before, achieved_after)``, both measured.
    """
    items = [(module, gate) for module, gate in gated_modules(model).values() if isinstance(gate, ThresholdGate)]
    if not items:
        raise ValueError("calibrate_thresholds: the model has no ThresholdGate")
    before = achieved_sparsity(model)
    # Per gate: sorted relative scores (|W|^2 / mean(W^2), or a neuron gate's unit scores), the
    # parameters each stands for, and how many may be pruned. The hard sparsity at factor a is the
    # parameter-weighted count of scores <= (a |threshold|)^2.
    relative = []
    for module, gate in items:
        values, weight, most = gate.calibration_values(module)
        relative.append((values, gate.threshold.abs().item(), weight, most))
    relative_weight = {id(gate): weight for (_, gate), (_, _, weight, _) in zip(items, relative)}
    total = sum(gate.numel for _, gate in items)

    finest = min(weight for _, _, weight, _ in relative)
    countable = all(gate.counts_by_score for _, gate in items)

    thresholds = [gate.threshold.detach().clone() for _, gate in items]

    def scale(factor: float, fine_factor: float) -> None:
        for (_, gate), threshold in zip(items, thresholds):
            gate.threshold.copy_(threshold * factor * (fine_factor if relative_weight[id(gate)] == finest else 1.0))

    def sparsity_at(factor: float, fine_factor: float = 1.0) -> float:
        if not countable:  # units share weights (conv layers): measure, the hard masks are cheap
            scale(factor, fine_factor)
            return achieved_sparsity(model)
        pruned = 0
        for values, threshold, weight, most in relative:
            scaled = factor * threshold * (fine_factor if weight == finest else 1.0)
            bound = torch.tensor(scaled ** 2, dtype=values.dtype, device=values.device)  # the scores' device
            count = int(torch.searchsorted(values, bound, right=True))
            pruned += min(count, most) * weight
        return pruned / total

    def bisect(fn) -> float:
        low, high = 0.0, 1.0
        while fn(high) < target_sparsity and high < 1e6:
            high *= 2
        for _ in range(iterations):
            mid = (low + high) / 2
            low, high = (mid, high) if fn(mid) < target_sparsity else (low, mid)
        # Step away from the score at the boundary, so float rounding in the hard mask cannot flip it.
        low, high = low * (1 - 1e-5), high * (1 + 1e-5)
        return high if abs(fn(high) - target_sparsity) <= abs(fn(low) - target_sparsity) else low

    factor = bisect(sparsity_at)
    # Units of different sizes (attention heads beside neurons) make sparsity_at jump by a whole
    # head; the finest-grained gates (single weights, or neurons) then close the remaining gap.
    fine_factor = 1.0
    if abs(sparsity_at(factor) - target_sparsity) > 1e-3 and any(w != finest for _, _, w, _ in relative):
        fine_factor = bisect(lambda f: sparsity_at(factor, f))
    scale(factor, fine_factor)
    return before, achieved_sparsity(model)


def fold(model: nn.Module) -> nn.Module:
    """Apply the hard masks and remove every gate/mask, in place; returns ``model``.

    The result is the same class with the same parameter names (``save_pretrained`` /
    ``from_pretrained`` compatible) and no gate parameters (:meth:`masks.Gate.fold`). Unit gates
    remove their pruned units from the matrices instead; the per-layer sizes then go into the
    config for :mod:`pinch_ray.core.pruned_modeling`, the loader of such models.
    """
    found = list(gated_modules(model).values())
    # every plan first, then the folding: a conv layer's filters are one gate's units and the next
    # gate's target
    plans = [gate.fold_plan(module) for module, gate in found]
    for (module, gate), plan in zip(found, plans):
        gate.fold(module, plan)
    unit_kinds = [gate.kind for _, gate in found if gate.kind != WEIGHT]
    if unit_kinds:
        pruned_modeling.mark_pruned(model, unit_kinds)
    return model
