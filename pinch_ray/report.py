"""Finalize one trial into its artifact directory, and summarise a whole pipeline run.

Per trial (:func:`finalize_trial`), written under a temporary name and renamed into place, with
``metrics.json`` last, so a directory named after the trial is always complete::

    <output_dir>/<trial>/model/  compact/  hypotheses/<split>.txt
                         per_layer_sparsity.csv  per_layer_sparsity.png  metrics.json

Per pipeline (:func:`write_summary`): ``summary.json``, ``summary.md`` (one table) and
``wer_vs_params.png`` from the complete trials' ``metrics.json``.

Plots use matplotlib's object API (``Figure``, Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from pinch_ray import evaluate, export, gates, pruned_modeling
from pinch_ray.config import DEFAULT_GATE_PATTERNS, FOUNDATION_TRIAL, METHODS, EvalConfig, raise_if_problems
from pinch_ray.models import count_parameters

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"  # written last: its presence marks a complete trial directory
LAYER_CSV, LAYER_PNG = "per_layer_sparsity.csv", "per_layer_sparsity.png"
SUMMARY_JSON, SUMMARY_MD, SUMMARY_PNG = "summary.json", "summary.md", "wer_vs_params.png"
VERSIONED = ("pinch_ray", "torch", "transformers", "ray")


# ----------------------------------------------------------------------------------------------
# Per-layer sparsity
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def measured_layer_sparsity(plain: torch.nn.Module, layer_names: Sequence[str]) -> list[gates.LayerSparsity]:
    """Exact zeros of the weight of each named module of a plain (folded) model; for a neuron-pruned
    model, the parameters of each layer's removed neurons / heads (measured from the layer shapes)."""
    units = pruned_modeling.unit_reduction(plain)
    if units:
        return [gates.LayerSparsity(name, numel, pruned) for name, numel, pruned in units]
    modules = dict(plain.named_modules())
    out = []
    for name in layer_names:
        weight = modules[name].weight
        out.append(gates.LayerSparsity(name, weight.numel(), int(weight.numel() - torch.count_nonzero(weight))))
    return out


def write_layer_csv(path: str | os.PathLike, layers: Sequence[gates.LayerSparsity]) -> None:
    """``layer,numel,pruned,sparsity`` rows, in module order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "numel", "pruned", "sparsity"])
    writer.writerows([l.name, l.numel, l.pruned, f"{l.sparsity:.6f}"] for l in layers)
    Path(path).write_text(buffer.getvalue())


def _short_name(name: str) -> str:
    """``wav2vec2.encoder.layers.3.attention.q_proj`` -> ``3.attn.q_proj`` (``...3.feed_forward`` ->
    ``3.ff``); else the last two parts."""
    if "encoder.layers." in name:
        return name.split("encoder.layers.")[-1].replace("attention", "attn").replace("feed_forward", "ff")
    return ".".join(name.split(".")[-2:])


def plot_layer_sparsity(path: str | os.PathLike, layers: Sequence[gates.LayerSparsity], target_sparsity: float,
                        title: str) -> None:
    """Bar chart: one bar per gated matrix (module order), sparsity on y, the target as a line."""
    fig = Figure(figsize=(max(6.0, 0.2 * len(layers) + 1.5), 4.0), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(layers)), [l.sparsity for l in layers], color="tab:blue")
    ax.axhline(target_sparsity, color="tab:red", linestyle="--", label=f"target {target_sparsity:.2f}")
    ax.set_xticks(range(len(layers)), [_short_name(l.name) for l in layers], rotation=90, fontsize=7)
    ax.set(ylim=(0, 1), xlabel="gated layer", ylabel="sparsity (fraction pruned)", title=title)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
# metrics.json
# ----------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Installed versions of pinch_ray, torch, transformers and ray (None if not installed)."""
    out = {}
    for package in VERSIONED:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def is_complete(directory: str | os.PathLike) -> bool:
    return (Path(directory) / METRICS_FILE).is_file()


def read_trial_hypotheses(directory: str | os.PathLike) -> dict[str, list[evaluate.Utterance]]:
    """``{split: utterances}`` from a complete trial's ``hypotheses/`` (e.g. the dense baseline's)."""
    return {path.stem: evaluate.read_hypotheses(path)
            for path in sorted((Path(directory) / "hypotheses").glob("*.txt"))}


def _transcribe(plain, processor, source: Any, cfg: EvalConfig) -> list[evaluate.Utterance]:
    """Ray Data actor pool for a Ray Dataset, this process for anything else (rows)."""
    if hasattr(source, "map_batches"):
        return evaluate.transcribe_dataset(source, plain, processor, batch_size=cfg.batch_size,
                                           num_actors=cfg.num_actors, num_gpus=cfg.gpus_per_actor)
    return evaluate.transcribe_rows(plain, processor, source, batch_size=cfg.batch_size)


@dataclass
class TrialInfo:
    """What finalize needs to know about a trial besides its model."""

    trial: str  # directory name under output_dir, e.g. "sspg-0.65"
    method: str  # dense | ump | sspg
    target_sparsity: float  # configured fraction of gated weights to remove
    compression_seconds: float | None = None  # wall time of the trial's training, seconds
    # From Compressor.finish(): hard sparsity before calibration, and whether calibration ran.
    achieved_sparsity_trained: float | None = None
    calibrated: bool | None = None


def finalize_trial(model: torch.nn.Module, processor, info: TrialInfo, output_dir: str | os.PathLike,
                   eval_data: Mapping[str, Any], *,
                   dense_hypotheses: Mapping[str, Sequence[evaluate.Utterance]] | None = None,
                   eval_cfg: EvalConfig | None = None, gate_patterns: Sequence[str] = DEFAULT_GATE_PATTERNS,
                   overwrite: bool = False) -> dict:
    """Hard prune, export, store compactly, evaluate and report one trial; returns its metrics.

    ``model``: the trained model, gated (sspg gates / ump masks) or plain (dense); left untouched.
    ``eval_data``: ``{split: Ray Dataset | iterable of shard rows}``; a Dataset is transcribed on
    a Ray Data actor pool, rows in this process. ``dense_hypotheses``: ``{split: utterances}`` of
    the dense baseline (:func:`read_trial_hypotheses`) for ``p_value_vs_dense``; None for the dense
    trial itself. ``eval_cfg``: batch size and actors of the inference (default ``EvalConfig()``).
    ``gate_patterns``: the layers listed in the per-layer report of a model without gates.
    A complete trial directory is kept (metrics returned) unless ``overwrite``.

    Raises:
        ConfigError: bad ``eval_cfg``.
        ValueError: bad trial name (see :func:`pinch_ray.export.trial_dir`), or the dense
            hypotheses do not cover the same utterances.
    """
    eval_cfg = eval_cfg or EvalConfig()
    raise_if_problems(eval_cfg.problems(), source="evaluation settings")
    final = export.trial_dir(output_dir, info.trial)
    if is_complete(final) and not overwrite:
        log.info("%s is complete; skipping (overwrite=True redoes it)", final)
        return json.loads((final / METRICS_FILE).read_text())
    export.remove_stale_tmp(final)

    unwrapped = getattr(model, "module", model)
    layer_names = list(gates.gated_modules(unwrapped)) or list(gates.select_modules(unwrapped, list(gate_patterns)))
    plain = export.pruned_copy(unwrapped)
    with export.atomic_dir(final) as tmp:
        export.export_model(plain, processor, tmp / "model")
        export.save_compact(tmp / "model", tmp / "compact")
        layers = measured_layer_sparsity(plain, layer_names)
        write_layer_csv(tmp / LAYER_CSV, layers)
        plot_layer_sparsity(tmp / LAYER_PNG, layers, info.target_sparsity, f"{info.trial}: sparsity per layer")

        (tmp / "hypotheses").mkdir()
        per_split = {}
        for split, source in eval_data.items():
            utterances = _transcribe(plain, processor, source, eval_cfg)
            evaluate.write_hypotheses(tmp / "hypotheses" / f"{split}.txt", utterances)
            per_split[split] = asdict(evaluate.score(utterances))
            baseline = (dense_hypotheses or {}).get(split)
            significance = evaluate.compare(utterances, baseline) if baseline is not None else None
            per_split[split]["p_value_vs_dense"] = significance.p_value if significance else None
            per_split[split]["z_vs_dense"] = significance.z if significance else None
            log.info("%s %s: WER %.4f CER %.4f (%d utterances)", info.trial, split, per_split[split]["wer"],
                     per_split[split]["cer"], per_split[split]["num_utterances"])

        metrics = _metrics(plain, info, layers, per_split, tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")  # last: the completion marker
    log.info("finalized %s", final)
    return metrics


def _metrics(plain, info: TrialInfo, layers, per_split: dict, directory: Path) -> dict:
    counts = count_parameters(plain)
    gated_numel = sum(l.numel for l in layers)
    model_bytes, compact_bytes = export.dir_bytes(directory / "model"), export.dir_bytes(directory / "compact")
    return {
        "trial": info.trial,
        "method": info.method,
        "target_sparsity": info.target_sparsity,
        # measured on the exported weights, over the gated matrices (never the configured value)
        "achieved_sparsity": sum(l.pruned for l in layers) / gated_numel if gated_numel else 0.0,
        "achieved_sparsity_trained": info.achieved_sparsity_trained,
        "calibrated": info.calibrated,
        "params_total": counts.total,
        "params_nonzero": counts.nonzero,
        "param_reduction": counts.reduction,
        "compression_ratio": counts.total / counts.nonzero,
        "wer": {split: s["wer"] for split, s in per_split.items()},
        "cer": {split: s["cer"] for split, s in per_split.items()},
        "p_value_vs_dense": {split: s["p_value_vs_dense"] for split, s in per_split.items()},
        "per_split": per_split,
        "compression_seconds": info.compression_seconds,
        "artifact_bytes": {"model": model_bytes, "compact": compact_bytes},
        "compact_ratio": compact_bytes / (directory / "model" / "model.safetensors").stat().st_size,
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------------------
# Pipeline summary
# ----------------------------------------------------------------------------------------------


def collect_trials(output_dir: str | os.PathLike) -> list[dict]:
    """``metrics.json`` of every complete trial under ``output_dir``: the ``foundation`` the trials
    started from (if any), dense, then each method by target (sspg and sspg-neuron interleaved)."""
    trials = [json.loads(path.read_text()) for path in Path(output_dir).glob(f"*/{METRICS_FILE}")
              if export.TRIAL_NAME.fullmatch(path.parent.name) and ".tmp-" not in path.parent.name]
    # sspg at both granularities side by side, target by target
    order = {m: i for i, m in enumerate(METHODS)} | {"sspg-neuron": METHODS.index("sspg")}
    return sorted(trials, key=lambda m: (m["trial"] != FOUNDATION_TRIAL, order.get(m["method"], len(order)),
                                         m["target_sparsity"], m["trial"]))


def default_plot_split(trials: Sequence[dict]) -> str | None:
    """The split plotted in ``wer_vs_params.png``: the first with "test" in its name, else the last."""
    splits = list(dict.fromkeys(s for m in trials for s in m["wer"]))
    return next((s for s in splits if "test" in s), splits[-1] if splits else None)


def _number(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def summary_table(trials: Sequence[dict]) -> str:
    """One markdown table: a row per trial; WER (%) and p-value vs dense per split."""
    splits = list(dict.fromkeys(s for m in trials for s in m["wer"]))
    header = (["trial", "method", "target", "achieved", "params (M, nonzero / total)"]
              + [f"WER {s} (%)" for s in splits] + [f"p vs dense {s}" for s in splits] + ["time (s)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in trials:
        row = [m["trial"], m["method"], f"{m['target_sparsity']:.2f}", f"{m['achieved_sparsity']:.3f}",
               f"{m['params_nonzero'] / 1e6:.3f} / {m['params_total'] / 1e6:.3f}"]
        row += [_number(None if m["wer"].get(s) is None else 100 * m["wer"][s], ".2f") for s in splits]
        row += [_number(m["p_value_vs_dense"].get(s), ".3g") for s in splits]
        row += [_number(m.get("compression_seconds"), ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_wer_vs_params(path: str | os.PathLike, trials: Sequence[dict], split: str) -> None:
    """WER on ``split`` against nonzero parameters: one marker style per method, dense as reference
    (a dotted line), the ``foundation`` the trials started from as a grey cross."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    start = [m for m in trials if m["trial"] == FOUNDATION_TRIAL and split in m["wer"]]
    if start:
        ax.plot([start[0]["params_nonzero"] / 1e6], [100 * start[0]["wer"][split]], marker="x", markersize=9,
                color="gray", linestyle="", label="start (foundation)")
    for method, marker in zip(METHODS, "*os^"):
        points = sorted((m["params_nonzero"] / 1e6, 100 * m["wer"][split]) for m in trials
                        if m["method"] == method and split in m["wer"] and m["trial"] != FOUNDATION_TRIAL)
        if not points:
            continue
        x, y = zip(*points)
        ax.plot(x, y, marker=marker, markersize=10 if method == "dense" else 7, label=method,
                linestyle="" if method == "dense" else "-")
        if method == "dense":
            ax.axhline(y[0], color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="nonzero parameters (M)", ylabel=f"WER on {split} (%)", title=f"WER vs. model size ({split})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def write_summary(output_dir: str | os.PathLike, plot_split: str | None = None) -> dict:
    """Write ``summary.json``, ``summary.md`` and ``wer_vs_params.png`` under ``output_dir``.

    Each file is replaced atomically. Returns the summary (``trials``: their metrics).

    Raises:
        ValueError: no complete trial under ``output_dir``.
    """
    output_dir = Path(output_dir)
    trials = collect_trials(output_dir)
    if not trials:
        raise ValueError(f"write_summary: no complete trial (<trial>/{METRICS_FILE}) under {output_dir}")
    split = plot_split or default_plot_split(trials)
    summary = {"plot_split": split, "trials": trials}
    export.atomic_write_text(output_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    export.atomic_write_text(output_dir / SUMMARY_MD, f"# pinch_ray summary\n\n{summary_table(trials)}")
    tmp_png = output_dir / f".{SUMMARY_PNG}.tmp-{os.getpid()}.png"
    plot_wer_vs_params(tmp_png, trials, split)
    os.replace(tmp_png, output_dir / SUMMARY_PNG)
    return summary
