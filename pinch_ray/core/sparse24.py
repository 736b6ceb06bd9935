"""2:4 semi-structured sparsity: the weight pattern GPU sparse tensor cores run faster.

NVIDIA GPUs from Ampere on (compute capability >= 8.0) multiply a matrix in which every group of
4 consecutive weights along the input dimension holds at most 2 nonzeros on sparse tensor cores
(``torch.sparse.to_sparse_semi_structured``, fp16/bf16). An unstructured ``sspg`` model does not
have that pattern by itself; this module gives it one and converts it:

- :func:`prune_2to4` keeps, in every group of 4, the 2 weights of largest magnitude (zeros the
  gates already removed count as the smallest), in the ``nn.Linear`` layers named by the gate
  patterns, in place; it reports each layer's sparsity before and after, so the extra pruning is
  measured, not hidden. The result is a plain HF model (stock ``from_pretrained`` loads it).
- :func:`to_semi_structured` swaps those weights for the compressed 2:4 form on a CUDA device.
  On a CPU (or an older GPU) it raises :class:`Semi24Unavailable` with the reason; callers skip.

``pinch-ray export-2to4 MODEL_DIR OUT_DIR`` runs :func:`prune_2to4` on an exported model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

GROUP = 4  # consecutive input weights per group
KEEP = 2  # nonzeros allowed per group


class Semi24Unavailable(RuntimeError):
    """2:4 kernels cannot run here (no CUDA device, or one older than compute capability 8.0)."""


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """bool mask shaped like ``weight`` [out, in]: the 2 largest |w| of every 4 consecutive inputs."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        raise ValueError(f"2:4 needs the input dimension to be a multiple of {GROUP} (got {in_features})")
    groups = weight.detach().abs().reshape(out_features, in_features // GROUP, GROUP)
    keep = groups.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs holds at most 2 nonzeros."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        return False
    nonzero = (weight.detach() != 0).reshape(out_features, in_features // GROUP, GROUP).sum(-1)
    return bool((nonzero <= KEEP).all())


def selected_linears(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose full name matches a pattern (the gate patterns)."""
    regexes = [re.compile(p) for p in patterns]
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(r.fullmatch(name) for r in regexes)}


@torch.no_grad()
def prune_2to4(model: nn.Module, patterns: Sequence[str]) -> list[dict]:
    """Give every selected Linear weight the 2:4 pattern, in place; returns per-layer sparsity
    ``{"layer", "numel", "sparsity_before", "sparsity_after"}`` (after is 0.5 unless the layer was
    sparser already: zeros stay zeros). A layer whose input size is not a multiple of 4 (e.g. a
    neuron-pruned ``output_dense``) stays as it is and says so under ``"skipped"``.

    Raises:
        ValueError: no Linear layer matches the patterns.
    """
    layers = selected_linears(model, patterns)
    if not layers:
        raise ValueError(f"prune_2to4: no nn.Linear layer matches {list(patterns)}")
    report = []
    for name, linear in layers.items():
        weight = linear.weight
        before = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
        entry = {"layer": name, "numel": weight.numel(), "sparsity_before": before}
        if linear.in_features % GROUP:
            entry["skipped"] = f"{linear.in_features} inputs, not a multiple of {GROUP}"
        else:
            weight.mul_(mask_2to4(weight).to(weight.dtype))
        report.append({**entry, "sparsity_after": 1.0 - int(torch.count_nonzero(weight)) / weight.numel()})
    return report


def check_available(device: torch.device | str) -> None:
    """Raise :class:`Semi24Unavailable` unless ``device`` can run 2:4 sparse kernels."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise Semi24Unavailable(f"2:4 semi-structured sparsity runs on CUDA GPUs only (device {device}); "
                                "skipped — the 2:4-pruned model still runs densely here")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise Semi24Unavailable(f"2:4 sparse tensor cores need compute capability >= 8.0 (Ampere); "
                                f"{torch.cuda.get_device_name(device)} has {major}.{minor}; skipped")


@torch.no_grad()
def to_semi_structured(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Swap the selected 2:4 Linear weights for ``to_sparse_semi_structured`` tensors, in place.

    The model must be on a CUDA device in fp16/bf16. Layers whose weight is not 2:4 (run
    :func:`prune_2to4` first) or whose shape the kernels reject stay dense. Returns the names of
    the converted layers.

    Raises:
        Semi24Unavailable: not on a CUDA GPU of compute capability >= 8.0.
    """
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, linear in selected_linears(model, patterns).items():
        check_available(linear.weight.device)
        if not is_2to4(linear.weight):
            continue
        try:
            linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight), requires_grad=False)
        except (RuntimeError, ValueError):  # a shape or dtype the kernels do not take: stays dense
            continue
        converted.append(name)
    return converted


def export_2to4(model_dir: str, out_dir: str, patterns: Sequence[str] | None = None) -> dict:
    """Load an exported model, give its gated Linear layers the 2:4 pattern (:func:`prune_2to4`)
    and write it, with its processor and ``sparsity_2to4.json``, to ``out_dir`` (atomically).

    Returns the report: per-layer sparsity before/after, and whether this machine can run the
    2:4 kernels (``"kernels"``: ``"available"`` or the reason they are not).

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
        ValueError: ``model_dir`` is not a model directory, or no layer can take the pattern.
    """
    import json
    import os
    from pathlib import Path

    from pinch_ray.config import DEFAULT_GATE_PATTERNS
    from pinch_ray.core.export import export_model
    from pinch_ray.storage import atomic_dir
    from pinch_ray.core.models import load_model

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"MODEL_DIR: {model_dir} is not an exported model directory (no config.json)")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"OUT_DIR: {out_dir} exists and is not empty; choose a new directory")
    model, processor = load_model(model_dir)
    layers = prune_2to4(model.eval(), list(patterns or DEFAULT_GATE_PATTERNS))
    try:
        check_available("cuda")
        kernels = "available"
    except Semi24Unavailable as reason:
        kernels = str(reason)
    numel = sum(layer["numel"] for layer in layers)
    report = {"model_dir": str(model_dir), "layers": layers, "kernels": kernels,
              "sparsity_before": sum(l["sparsity_before"] * l["numel"] for l in layers) / numel,
              "sparsity_after": sum(l["sparsity_after"] * l["numel"] for l in layers) / numel}
    with atomic_dir(out_dir) as tmp:
        export_model(model, processor, tmp)
        (Path(tmp) / "sparsity_2to4.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
