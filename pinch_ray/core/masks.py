"""The gate protocol and the per-weight gates: what parametrizes one gated ``weight``.

A gate is a ``torch.nn.utils.parametrize`` parametrization of a module's ``weight`` (:class:`Gate`):
in ``train()`` mode a soft mask, in ``eval()`` mode the hard one (:func:`pinch_ray.core.gates.gate_mode`
overrides that). Every kind answers the same questions, so the model-level operations in
:mod:`pinch_ray.core.gates` never ask which kind a gate is: its hard mask on the weight, its
parameter counts, its calibration scores, and how it folds into the model.

Kinds: :class:`ThresholdGate` (one learnable threshold per matrix, weights pinched one by one,
the paper's method), :class:`FixedMask` (the ``ump`` / ``two-stage`` baselines) and the unit gates
of :mod:`pinch_ray.core.neurons` (whole neurons, heads, conv channels).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

WEIGHT = "weight"  # Gate.kind of the gates that mask single weights (unit gates: ffn, heads, conv)


# ----------------------------------------------------------------------------------------------
# The soft mask, fused: forward computes W * M and sum(M), backward in closed form.
# ----------------------------------------------------------------------------------------------

# The sigmoid's argument z is clamped to [-20, 20] so that no mask value, exp(-z), product with
# them or AdamW state built from them is a denormal float: x86 CPUs run denormal arithmetic ~100x
# slower, and late in training, with a small temperature, most pruned weights sit at z < -100
# (M < 4e-44; their gradients g * M square to nothing in AdamW). In float32, sigmoid(z) is 1.0
# above z = 17, so the upper clamp changes nothing; below -20, M becomes sigmoid(-20) = 2.1e-9
# instead of something smaller: W * M moves by < 2.1e-9 |W|, and such weights got (and get) no
# learning signal (M (1 - M) < 2.1e-9). float64 (tests) gets wider bounds with the same
# properties. Unclamped, a late-training sspg step ran 37x a dense one on CPU (docs/benchmarks.md).
_Z_BOUNDS = {torch.float64: (-700.0, 40.0)}
_Z_BOUNDS_DEFAULT = (-20.0, 20.0)


def _mask_from_squares(w2, threshold, tau, inv_scale):
    """``M = sigmoid(clamp((W^2/s - threshold^2) / (2 tau)))`` computed in place in ``w2 = W^2``."""
    z = w2.mul_(inv_scale / (2 * tau)).sub_(threshold * threshold / (2 * tau))
    return z.clamp_(*_Z_BOUNDS.get(w2.dtype, _Z_BOUNDS_DEFAULT)).sigmoid_()


def _soft_mask_forward(weight, threshold, tau):
    """``W * M``, ``sum(M)``, ``1/s`` for ``M = sigmoid((W^2/s - threshold^2) / (2 tau))``.

    ``M`` is not kept: backward recomputes it from ``W`` (an ``exp`` per weight, fused into the
    backward kernel), where keeping it would hold one more tensor per gated weight until backward.
    """
    w2 = weight * weight
    inv_scale = 1.0 / w2.mean().clamp_min(1e-30)  # 1/s, no gradient by construction
    mask = _mask_from_squares(w2, threshold, tau, inv_scale)
    return weight * mask, mask.sum(), inv_scale


def _soft_mask_backward(grad_out, grad_mask_sum, weight, threshold, inv_scale, tau, regrow=False):
    """Gradients of ``(W * M, sum(M))`` w.r.t. ``W`` and ``threshold``.

    dz/dW = W / (tau s), dz/dthreshold = -threshold / tau, dM/dz = M (1 - M); upstream of z, per
    element: ``grad_out * W`` (through W * M) + ``grad_mask_sum`` (through sum(M)). The weight's
    own term is ``grad_out * M``; with ``regrow`` it is ``grad_out`` (straight through the mask), so
    a pruned weight still receives the loss gradient and can grow back over the threshold.
    """
    mask = _mask_from_squares(weight * weight, threshold, tau, inv_scale)
    direct = grad_out if regrow else grad_out * mask
    dz = (grad_out * weight).add_(grad_mask_sum).mul_(mask).mul_(1 - mask)
    grad_threshold = -(threshold / tau) * dz.sum()
    grad_weight = dz.mul_(weight).mul_(inv_scale / tau).add_(direct)
    return grad_weight, grad_threshold


# Below this many entries a CPU weight runs the kernels eagerly: they cost per-op dispatch there,
# not memory passes, and compiling (~20 s once per process on 2 cores) would not pay off.
CPU_COMPILE_MIN_NUMEL = 1 << 18
# torch.compile settings per device type. GPUs: one graph per weight shape (static shapes give the
# fastest kernels); CPUs: one dynamic-shape graph, Inductor's C++ backend (needs a C++ compiler).
COMPILE_OPTIONS = {"cpu": {"dynamic": True}}
GPU_COMPILE_OPTIONS = {"dynamic": False}
_compiled: dict = {}  # (fn, device type) -> its compiled form
_variants: set = set()  # the graphs compiled so far: (kernel, device type, argument shapes/dtypes/flags)
_fallback: dict = {}  # {"reason": ...} once a compiler failure made the kernels run eagerly


def _compiled_kernel(fn, device_type: str):
    """``fn`` compiled by ``torch.compile`` for ``device_type`` (cached per process)."""
    key = (fn, device_type)
    if key not in _compiled:
        options = COMPILE_OPTIONS.get(device_type, GPU_COMPILE_OPTIONS)
        _compiled[key] = torch.compile(fn, fullgraph=True, **options)
    return _compiled[key]


def _variant(fn, device_type: str, args: tuple) -> tuple:
    """What one compiled graph of ``fn`` is specialised on: each argument's shape and dtype (a
    dynamic-shape graph: its dimensions; one of size 0 or 1 is specialised anyway), plain values."""
    dynamic = COMPILE_OPTIONS.get(device_type, GPU_COMPILE_OPTIONS).get("dynamic")
    shapes = tuple((a.dim() if dynamic else tuple(a.shape), tuple(n <= 1 for n in a.shape), a.dtype)
                   if isinstance(a, torch.Tensor) else a for a in args)
    return fn.__name__, device_type, shapes


def _allow_variants(fn) -> None:
    """Let torch.compile hold every graph of ``fn`` this process needs. Its recompile limit (8
    graphs per function) is below what a gated wav2vec2-base needs (a graph per weight shape: 8
    with the feature encoder gated, more for other models); at the limit it raises, and the
    kernels would run eagerly from then on, for every layer. The graphs are few and known (one per
    gated shape), so the limit grows with them instead."""
    needed = sum(1 for variant in _variants if variant[0] == fn.__name__)
    config = torch._dynamo.config
    if needed > config.recompile_limit:
        config.recompile_limit = needed
    if len(_variants) > config.accumulated_recompile_limit:
        config.accumulated_recompile_limit = len(_variants)


def compile_report() -> dict:
    """``{"variants": graphs compiled so far, "fallback": why the kernels run eagerly, or None}``:
    what benchmarks/gpu_check.sh prints, and tests check."""
    return {"variants": len(_variants), "fallback": _fallback.get("reason")}


def reset_compiled() -> None:
    """Forget every compiled kernel and a fallback (tests, benchmarks: a fresh start in one process)."""
    _compiled.clear()
    _variants.clear()
    _fallback.clear()
    torch._dynamo.reset()


def _run(fn, *args):
    """``fn(*args)``, compiled into a few fused kernels on GPUs and for large CPU weights (the
    first argument is shaped like the weight).

    Compiled kernels cut the sspg/dense step-time ratio on GPUs and CPUs alike
    (benchmarks/gate_overhead.py; docs/benchmarks.md). A compiler failure logs a warning and
    runs eagerly from then on (:func:`compile_report` says so).
    """
    device_type = args[0].device.type
    if _fallback or (device_type == "cpu" and args[0].numel() < CPU_COMPILE_MIN_NUMEL):
        return fn(*args)
    # Detached: the kernels run inside an autograd.Function (gradients written by hand), and a
    # graph is specialised on requires_grad too (the positional conv's weight_norm weight has it
    # in training, not when the starting sparsity is measured under no_grad: a second graph).
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    variant = _variant(fn, device_type, args)
    if variant not in _variants:
        _variants.add(variant)
        _allow_variants(fn)
    try:
        # Autocast off: the inputs are fp32 master weights, and one autocast state means one
        # compiled graph (no recompiles when the caller toggles autocast).
        with torch.autocast(device_type, enabled=False):
            return _compiled_kernel(fn, device_type)(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure: keep training, eagerly
        logging.getLogger(__name__).warning("torch.compile of the gate kernels failed (%s); running eagerly", err)
        _fallback["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return fn(*args)


class _SoftMaskedWeight(torch.autograd.Function):
    """``(W * M, sum(M))`` with ``M = sigmoid((W^2/s - threshold^2) / (2 tau))``, ``s = mean(W^2)``.

    Hand-written backward so the step costs a few elementwise passes over ``W`` (autograd through
    the same expression stores several temporaries per layer) and keeps no tensor of its own for
    backward. ``tau`` is a 0-dim tensor, so an annealed temperature never recompiles; ``regrow``
    (bool, :class:`ThresholdGate`) picks the weight gradient of :func:`_soft_mask_backward`.
    """

    @staticmethod
    def forward(ctx, weight, threshold, tau, regrow=False):
        masked, mask_sum, inv_scale = _run(_soft_mask_forward, weight, threshold, tau)
        ctx.save_for_backward(weight, threshold, inv_scale, tau)
        ctx.regrow = bool(regrow)
        return masked, mask_sum

    @staticmethod
    def backward(ctx, grad_out, grad_mask_sum):
        weight, threshold, inv_scale, tau = ctx.saved_tensors
        if grad_mask_sum is None:
            grad_mask_sum = torch.zeros((), dtype=weight.dtype, device=weight.device)
        grad_weight, grad_threshold = _run(_soft_mask_backward, grad_out.contiguous(), grad_mask_sum, weight,
                                           threshold, inv_scale, tau, ctx.regrow)
        return grad_weight, grad_threshold, None, None


def hard_mask(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``|W| > t`` with ``t = |threshold| * rms(W)``; bool tensor shaped like ``weight``."""
    w2 = weight.detach().float().pow(2)
    return w2 > threshold.detach().float().pow(2) * w2.mean()


def unmasked_weight(module: nn.Module) -> torch.Tensor:
    """The weight a gated module would have without its gate (other parametrizations applied)."""
    plist = module.parametrizations.weight
    if plist.is_tensor:
        x, rest = plist.original, list(plist)[:-1]
    else:  # e.g. weight_norm: several original tensors
        x = plist[0](*(getattr(plist, f"original{i}") for i in range(plist.ntensors)))
        rest = list(plist)[1:-1]
    for parametrization in rest:
        x = parametrization(x)
    return x


def fold_weight(module: nn.Module, keep: torch.Tensor) -> None:
    """Remove the gate of ``module.weight`` and zero the entries ``keep`` (bool, weight-shaped)
    drops, in place. A weight-normalised convolution (wav2vec2's positional conv) is re-normalised
    from the masked weight, so it keeps its ``weight_g`` / ``weight_v`` form."""
    with torch.no_grad():
        masked = unmasked_weight(module) * keep.to(module.weight.dtype)
    plist = module.parametrizations.weight
    if plist.is_tensor:  # the original Parameter stays (same object, same requires_grad)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            module.weight.copy_(masked)
        return
    weight_norm_dim = getattr(plist[0], "dim", None)  # weight_norm underneath the gate
    if weight_norm_dim is None:
        raise ValueError(f"fold: unsupported parametrization {type(plist[0]).__name__} "
                         f"under a gate in {type(module).__name__}")
    # Outside no_grad, so the weight comes back as a Parameter that weight_norm can split again.
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    with torch.no_grad():
        module.weight.copy_(masked)
    nn.utils.parametrizations.weight_norm(module, name="weight", dim=weight_norm_dim)


class Gate(nn.Module):
    """The protocol of every gate: a parametrization of one module's ``weight``.

    This base class serves gates that decide weight by weight from a weight-shaped hard mask
    (:meth:`weight_hard_mask`); unit gates override what differs.
    """

    kind = WEIGHT  # what one decision removes: single weights, or a unit kind (ffn, heads, conv)
    numel: int  # parameters the gate decides on
    counts_by_score = True  # the hard sparsity at a threshold follows from sorted scores alone (calibration)

    def weight_hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The final mask of ``weight`` (the gated module's weight without this gate): bool, its shape."""
        raise NotImplementedError

    @torch.no_grad()
    def hard_counts(self, module: nn.Module) -> tuple[int, int]:
        """(parameters the gate decides on, parameters its hard mask removes)."""
        mask = self.weight_hard_mask(unmasked_weight(module))
        return mask.numel(), int(mask.numel() - mask.sum())

    @torch.no_grad()
    def parameter_counts(self, module: nn.Module) -> tuple[set[int], int, int, int]:
        """What the gate adds to a model's parameter counts: ``(ids of the parameters it accounts
        for itself, their total, gated, nonzero)`` (:func:`pinch_ray.core.models.count_parameters`)."""
        originals = list(module.parametrizations.weight.parameters(recurse=False))  # weight_norm: g and v
        numel = sum(p.numel() for p in originals)
        gated, pruned = self.hard_counts(module)
        return {id(p) for p in originals}, numel, gated, numel - pruned

    def fold_plan(self, module: nn.Module):
        """What :meth:`fold` applies, computed for every gate of a model before any folds."""
        return self.weight_hard_mask(unmasked_weight(module))

    def fold(self, module: nn.Module, plan) -> None:
        """Remove this gate, leaving the hard-masked weight in the model (in place)."""
        fold_weight(module, plan)


class ThresholdGate(Gate):
    """One learnable threshold for a whole matrix: soft mask in ``train()``, hard mask in ``eval()``.

    ``threshold`` is the only parameter (a scalar, in units of the layer's RMS weight). ``tau`` is
    the current relative temperature, set by the training loop through
    :func:`pinch_ray.core.gates.set_tau`. ``regrow``: the weights' own gradient passes the soft mask
    straight through (``GateConfig.regrow``).
    """

    def __init__(self, threshold_init: float, tau: float, numel: int, regrow: bool = False):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold_init)))
        self.numel = int(numel)  # parameters the gate decides on
        self.regrow = bool(regrow)
        # current relative temperature; a tensor so compiled kernels take new values as data
        self.register_buffer("tau", torch.tensor(float(tau)), persistent=False)
        self.mode: str | None = None  # None: follow self.training; "soft" / "hard": forced
        self.last_mask_sum: torch.Tensor | None = None  # kept parameters (sum(M)) of the latest soft forward

    def is_soft(self) -> bool:
        return self.training if self.mode is None else self.mode == "soft"

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.is_soft():
            return weight * hard_mask(weight, self.threshold).to(weight.dtype)
        masked, self.last_mask_sum = _SoftMaskedWeight.apply(weight, self.threshold, self.tau, self.regrow)
        return masked

    def weight_hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return hard_mask(weight, self.threshold)

    def fresh_mask_sum(self, module: nn.Module) -> torch.Tensor:
        """Kept parameters under the soft mask, computed on the spot (differentiable), for a gate
        the last forward did not use."""
        return _SoftMaskedWeight.apply(unmasked_weight(module), self.threshold, self.tau, self.regrow)[1]

    def soft_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The soft mask itself (no gradient), for inspection and tests."""
        w2 = weight.detach().pow(2)
        return _mask_from_squares(w2, self.threshold.detach(), self.tau, 1.0 / w2.mean())

    @torch.no_grad()
    def calibration_values(self, module: nn.Module) -> tuple[torch.Tensor, int, int]:
        """Sorted relative scores (a weight is pruned when its score <= threshold^2), parameters
        per score, and how many scores may be pruned."""
        w2 = unmasked_weight(module).float().pow(2)
        return (w2 / w2.mean()).flatten().sort().values, 1, w2.numel()


class FixedMask(Gate):
    """A fixed boolean mask (the ``ump`` / ``two-stage`` baselines); no parameters."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self.numel = self.mask.numel()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def weight_hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask
