"""The strong peers of sspg at equal budget: gradual magnitude pruning, movement pruning and PARP.

Each trains in one pass under the same steps, learning-rate schedule, distillation and target basis
as ``sspg`` (:class:`pinch_ray.core.compressor.Compressor`), over one gated layer set: the matrices
``gates.patterns`` select, no conv layer (``GateConfig.for_method``), the set ``ump`` prunes. Every
mask here is a hard 0/1 mask re-ranked while training, so the exported model has exactly
``round(target x gated parameters)`` zeros (``gates.mask_ranking: global``; ``layer`` rounds per
matrix), with no calibration.

- ``gmp`` (Zhu & Gupta 2017, "To prune, or not to prune"; "GMP*" of Kurtic & Alistarh 2022): the
  sparsity follows the cubic schedule ``s_t = s* (1 - (1 - t / T)^3)`` over the same ramp as sspg's
  target (``gates.target_warmup_fraction`` of training); every ``gates.mask_update_every`` steps the
  mask keeps the largest ``|W * M|`` (a pruned weight stays pruned), then it stays fixed while the
  rest recover.
- ``movement`` (Sanh, Wolf & Rush 2020, "Movement Pruning"): each weight has a learned importance
  score ``S``; the forward pass uses ``W * M`` with ``M`` the top-ranked scores, and the straight-
  through estimator gives ``dL/dS = dL/d(W * M) * W``. Scores accumulate that gradient with a plain
  step of 1, ``S = -sum_t W_t dL/dW'_t`` (the paper's eq. 6, the accumulated movement); the ranking
  is scale-free, so there is no score learning rate to tune. The variant: the top-v ranking (the
  paper's "hard" movement pruning) under the same cubic schedule as gmp, re-ranked every
  ``mask_update_every`` steps to the end of training. Soft movement pruning's regularised threshold
  reaches a sparsity only approximately, and every method here must hit its target exactly on the
  exported model.
- ``parp`` (Lai et al. 2021, "PARP: Prune, Adjust and Re-Prune for Self-Supervised Speech
  Recognition"): the starting model is pruned once by magnitude to the target and the pruned
  weights are zeroed; training then updates every weight, the zeroed ones included (they may
  regrow), and every ``mask_update_every`` steps (and at the end) the weights are re-pruned to the
  target by magnitude and the pruned ones zeroed again.

Pure PyTorch (no Ray). Masks are buffers and scores parameters of the model, so a checkpoint of the
model's ``state_dict`` resumes with the same masks; every update depends only on the (DDP-
synchronised) weights, scores and the step, so every rank computes the same masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from pinch_ray.config import GateConfig
from pinch_ray.core.masks import Gate, unmasked_weight


class RankedMask(Gate):
    """A 0/1 mask that the training loop re-ranks (gmp; base of the others): ``W * mask`` in the
    forward pass, in training and evaluation alike."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))
        self.numel = weight.numel()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def weight_hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask

    @torch.no_grad()
    def importance(self, weight: torch.Tensor) -> torch.Tensor:
        """What the ranking keeps the largest of: ``|W * M|``, so a pruned weight stays pruned."""
        return weight.detach().abs() * self.mask

    def after_update(self, module: nn.Module) -> None:
        """What a new mask does to the module's weight (nothing: the mask hides it)."""


class _ScoredMask(torch.autograd.Function):
    """``W * M`` with the straight-through estimator for the scores: ``dL/dS = dL/d(W M) * W``."""

    @staticmethod
    def forward(ctx, weight, scores, mask):
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad_out):
        weight, mask = ctx.saved_tensors
        return grad_out * mask, grad_out * weight, None


class MovementMask(RankedMask):
    """Movement pruning: ``scores`` (a parameter shaped like the weight, starting at 0) rank the
    weights; :func:`accumulate_movement` turns each step's score gradient into accumulated movement."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.scores = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _ScoredMask.apply(weight, self.scores.to(weight.dtype), self.mask.to(weight.dtype))

    @torch.no_grad()
    def importance(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scores.detach().float()


class ParpMask(RankedMask):
    """PARP: the weight trains unmasked (pruned entries were zeroed and may regrow); the mask of
    the latest re-prune applies in evaluation and in the export."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.training else weight * self.mask.to(weight.dtype)

    @torch.no_grad()
    def importance(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs()

    @torch.no_grad()
    def after_update(self, module: nn.Module) -> None:
        """Zero the pruned weights in place (the Parameter under the mask), so they regrow from 0."""
        original = module.parametrizations.weight.original
        original.mul_(self.mask.to(original.dtype))


GATE_CLASSES = {"gmp": RankedMask, "movement": MovementMask, "parp": ParpMask}


def attach_ranked_masks(model: nn.Module, method: str, modules: dict[str, nn.Module]) -> dict[str, RankedMask]:
    """Put ``method``'s mask (all ones) on the weight of each module; returns them by module name."""
    masks = {}
    for name, module in modules.items():
        masks[name] = GATE_CLASSES[method](module.weight.detach()).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", masks[name], unsafe=True)
    return masks


def ranked_masks(model: nn.Module) -> list[tuple[nn.Module, RankedMask]]:
    """``(module, mask)`` of every :class:`RankedMask` of ``model`` (DDP-wrapped or not), in module order."""
    model = getattr(model, "module", model)
    return [(module, module.parametrizations.weight[-1]) for module in model.modules()
            if parametrize.is_parametrized(module, "weight")
            and isinstance(module.parametrizations.weight[-1], RankedMask)]


def cubic_sparsity(step: int, ramp_steps: float, target: float) -> float:
    """Zhu & Gupta's schedule: ``target (1 - (1 - step / ramp_steps)^3)``, then ``target``."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return target
    return target * (1.0 - (1.0 - max(step, 0) / ramp_steps) ** 3)


def _smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of ``scores`` (1-D) that is False at exactly ``count`` entries, the smallest (ties
    at the boundary broken by position)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count <= 0:
        return keep
    if count >= scores.numel():
        return ~keep
    boundary = scores.kthvalue(count).values
    keep = scores > boundary
    surplus = int((~keep).sum()) - count  # entries equal to the boundary beyond the count: kept
    if surplus > 0:
        ties = torch.nonzero(scores == boundary).flatten()
        keep[ties[-surplus:]] = True
    return keep


@torch.no_grad()
def update_masks(model: nn.Module, sparsity: float, ranking: str = "global") -> None:
    """Re-rank every :class:`RankedMask` of ``model`` to ``sparsity`` (fraction of the gated weights):
    ``global``, exactly ``round(sparsity x all)`` of the lowest importances over every matrix;
    ``layer``, ``round(sparsity x numel)`` in each matrix. Then each mask's :meth:`RankedMask.after_update`."""
    items = ranked_masks(model)
    if not items:
        raise ValueError("update_masks: the model has no gmp / movement / parp masks")
    scores = [mask.importance(unmasked_weight(module)).flatten() for module, mask in items]
    if ranking == "global":
        flat = torch.cat([s.float() for s in scores])
        keep = _smallest(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores])
    elif ranking == "layer":
        keep = [_smallest(s.float(), round(sparsity * s.numel())) for s in scores]
    else:
        raise ValueError(f"mask ranking must be global or layer, not {ranking!r}")
    for (module, mask), kept in zip(items, keep):
        mask.mask.copy_(kept.view_as(mask.mask))
        mask.after_update(module)


@torch.no_grad()
def accumulate_movement(model: nn.Module) -> None:
    """``S -= dL/dS`` for every movement score, then clear its gradient: the scores are the
    accumulated movement (a plain step of 1, no optimizer). Call after backward (DDP has averaged
    the gradients, so every rank accumulates the same)."""
    for _, mask in ranked_masks(model):
        if isinstance(mask, MovementMask) and mask.scores.grad is not None:
            mask.scores.sub_(mask.scores.grad)
            mask.scores.grad = None


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The movement scores of ``model`` (not the model's parameters: no optimizer, no clipping)."""
    return [mask.scores for _, mask in ranked_masks(model) if isinstance(mask, MovementMask)]


class MaskSchedule:
    """When and to what sparsity a peer method's masks are re-ranked.

    ``method``'s masks move to :meth:`sparsity_at` at every step that is a multiple of
    ``gates.mask_update_every``, at the end of the ramp (gmp: the last update) and at the end of
    training (movement, parp). parp starts at the target (its one-shot prune, :meth:`start`).
    """

    def __init__(self, method: str, target: float, max_steps: int, cfg: GateConfig):
        self.method, self.target, self.max_steps, self.cfg = method, float(target), int(max_steps), cfg
        self.ramp_end = math.ceil(cfg.target_warmup_fraction * max_steps)

    def sparsity_at(self, step: int) -> float:
        if self.method == "parp":
            return self.target
        return cubic_sparsity(step, self.ramp_end, self.target)

    def due(self, step: int) -> bool:
        """Whether the masks are re-ranked after optimizer step ``step`` (1-based)."""
        last = self.ramp_end if self.method == "gmp" else self.max_steps
        return step <= last and (step % self.cfg.mask_update_every == 0 or step in (self.ramp_end, last))

    def start(self, model: nn.Module) -> None:
        """Before the first step: parp's one-shot magnitude prune to the target (gmp's and movement's
        too without a ramp, ``target_warmup_fraction: 0``); else they start dense."""
        if self.sparsity_at(0) > 0:
            update_masks(model, self.sparsity_at(0), self.cfg.mask_ranking)

    def after_step(self, model: nn.Module, step: int) -> float | None:
        """Re-rank if ``step`` is due; returns the sparsity it ranked to, or None."""
        if not self.due(step):
            return None
        sparsity = self.sparsity_at(step)
        update_masks(model, sparsity, self.cfg.mask_ranking)
        return sparsity
