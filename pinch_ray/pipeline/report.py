"""Finalize one trial into its artifact directory, and summarise a whole pipeline run.

Per trial (:func:`finalize_trial`), written under a temporary name and renamed into place, with
``metrics.json`` last, so a directory named after the trial is always complete::

    <output_dir>/<trial>/model/  compact/  hypotheses/<split>.txt
                         per_layer_sparsity.csv  per_layer_sparsity.png  metrics.json

Per pipeline (:func:`write_summary`): ``summary.json``, ``summary.md`` (the trials; over seeds; the
peers of sspg at each target) and ``wer_vs_params.png`` from the complete trials' ``metrics.json``.

Plots use matplotlib's object API (``Figure``, Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.figure import Figure

from pinch_ray import storage
from pinch_ray.config import (DEFAULT_GATE_PATTERNS, DENSE, FOUNDATION_TRIAL, METHODS, DataConfig, EvalConfig,
                              raise_if_problems)
from pinch_ray.core import export, gates, pruned_modeling, scoring
from pinch_ray.core.models import count_parameters
from pinch_ray.pipeline.transcribe import transcribe_dataset

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


def plot_layer_sparsity(path: str | os.PathLike, layers: Sequence[gates.LayerSparsity], title: str) -> None:
    """Bar chart: one bar per gated matrix (module order), sparsity on y, the sparsity of all gated
    layers together as a line (bars spread around it when the per-layer allocation is learned)."""
    overall = sum(l.pruned for l in layers) / max(sum(l.numel for l in layers), 1)
    fig = Figure(figsize=(max(6.0, 0.2 * len(layers) + 1.5), 4.0), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(layers)), [l.sparsity for l in layers], color="tab:blue")
    ax.axhline(overall, color="tab:red", linestyle="--", label=f"all gated layers {overall:.3f}")
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


def read_trial_hypotheses(directory: str | os.PathLike) -> dict[str, list[scoring.Utterance]]:
    """``{split: utterances}`` from a complete trial's ``hypotheses/`` (e.g. the dense baseline's)."""
    return {path.stem: scoring.read_hypotheses(path)
            for path in sorted((Path(directory) / "hypotheses").glob("*.txt"))}


def _transcribe(plain, processor, source: Any, cfg: EvalConfig) -> list[scoring.Utterance]:
    """Ray Data actor pool for a Ray Dataset, this process for anything else (rows)."""
    if hasattr(source, "map_batches"):
        return transcribe_dataset(source, plain, processor, batch_size=cfg.batch_size,
                                  num_actors=cfg.num_actors, num_gpus=cfg.gpus_per_actor)
    return scoring.transcribe_rows(plain, processor, source, batch_size=cfg.batch_size)


@contextlib.contextmanager
def _timed(seconds: dict, key: str):
    """Add the block's wall time to ``seconds[key]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started


@dataclass
class TrialInfo:
    """What finalize needs to know about a trial besides its model."""

    trial: str  # directory name under output_dir, e.g. "sspg-0.65"
    method: str  # dense | ump | two-stage | sspg | sspg-neuron
    target_sparsity: float  # configured fraction of target_basis to remove
    target_basis: str = "params"  # params (all parameters) or gated (SweepConfig.target_basis)
    seed: int | None = None  # training.seed of the run (sweep.seeds: one trial per seed)
    dense_reference: str | None = None  # the dense trial p_value_vs_dense compares with (None: none)
    # wall time of the compression, seconds: the trial's training, plus the dense run's for two-stage
    compression_seconds: float | None = None
    training_seconds: float | None = None  # wall time of the trial's own training, seconds
    # From Compressor.finish(): hard sparsity before calibration, and whether calibration ran.
    achieved_sparsity_trained: float | None = None
    calibrated: bool | None = None
    base_model: str | None = None  # what the pipeline compressed (model.init_from), for the model card
    corpus: str | None = None  # the corpus it was trained and evaluated on (corpus.root), for the model card

    @classmethod
    def from_train_result(cls, trial: str, result: dict, dense_reference: str | None = None,
                          reference_seconds: float | None = None, **context) -> "TrialInfo":
        """From a run's ``train_result.json``; ``reference_seconds``: the training time of the dense
        run a ``two-stage`` trial pruned, added to its compression time."""
        seconds = result.get("compression_seconds")
        if result["method"] == "two-stage" and seconds is not None and reference_seconds is not None:
            seconds += reference_seconds
        return cls(trial=trial, method=result["method"], target_sparsity=result["target_sparsity"],
                   target_basis=result.get("target_basis", "gated"), seed=result.get("seed"),
                   dense_reference=dense_reference, compression_seconds=seconds,
                   training_seconds=result.get("compression_seconds"),
                   achieved_sparsity_trained=result.get("achieved_sparsity_trained"),
                   calibrated=result.get("calibrated"), **context)


def finalize_trial(model: torch.nn.Module, processor, info: TrialInfo, output_dir: str | os.PathLike,
                   eval_data: Mapping[str, Any], *,
                   dense_hypotheses: Mapping[str, Sequence[scoring.Utterance]] | None = None,
                   eval_cfg: EvalConfig | None = None, gate_patterns: Sequence[str] = DEFAULT_GATE_PATTERNS,
                   data_cfg: DataConfig | None = None, overwrite: bool = False) -> dict:
    """Hard prune, export, store compactly, evaluate and report one trial; returns its metrics.

    ``model``: the trained model, gated (sspg gates / ump masks) or plain (dense); left untouched.
    ``eval_data``: ``{split: Ray Dataset | iterable of shard rows}``; a Dataset is transcribed on
    a Ray Data actor pool, rows in this process. ``dense_hypotheses``: ``{split: utterances}`` of
    the dense baseline (:func:`read_trial_hypotheses`) for ``p_value_vs_dense``; None for the dense
    trial itself. ``eval_cfg``: batch size and actors of the inference (default ``EvalConfig()``).
    ``gate_patterns``: the layers listed in the per-layer report of a model without gates.
    ``data_cfg``: the features the model was trained on; its exported feature extractor gets the
    same normalisation and sample rate (None: the processor as it is). ``model/`` gets a model card
    (``README.md``, :func:`model_card`). A complete trial directory is kept (metrics returned)
    unless ``overwrite``.

    Raises:
        ConfigError: bad ``eval_cfg``.
        ValueError: bad trial name (see :func:`pinch_ray.core.export.trial_dir`), or the dense
            hypotheses do not cover the same utterances.
    """
    eval_cfg = eval_cfg or EvalConfig()
    raise_if_problems(eval_cfg.problems(), source="evaluation settings")
    final = export.trial_dir(output_dir, info.trial)
    if is_complete(final) and not overwrite:
        log.info("%s is complete; skipping (overwrite=True redoes it)", final)
        return json.loads((final / METRICS_FILE).read_text())
    storage.remove_stale_tmp(final)

    started = time.perf_counter()
    seconds = {}  # where finalize spends its time: export, compact, evaluation, the rest
    unwrapped = getattr(model, "module", model)
    layer_names = list(gates.gated_modules(unwrapped)) or list(gates.select_modules(unwrapped, list(gate_patterns)))
    plain = export.pruned_copy(unwrapped)
    if data_cfg is not None:  # served the way it was trained (the checkpoint's processor may say otherwise)
        processor = copy.deepcopy(processor)
        processor.feature_extractor.do_normalize = data_cfg.normalize
        processor.feature_extractor.sampling_rate = data_cfg.sample_rate
    with storage.atomic_dir(final) as tmp:
        with _timed(seconds, "export"):
            export.export_model(plain, processor, tmp / "model")
        with _timed(seconds, "compact"):
            export.save_compact(tmp / "model", tmp / "compact")
        layers = measured_layer_sparsity(plain, layer_names)
        write_layer_csv(tmp / LAYER_CSV, layers)
        plot_layer_sparsity(tmp / LAYER_PNG, layers, f"{info.trial}: sparsity per layer")

        (tmp / "hypotheses").mkdir()
        per_split = {}
        for split, source in eval_data.items():
            with _timed(seconds, "evaluation"):
                utterances = _transcribe(plain, processor, source, eval_cfg)
            scoring.write_hypotheses(tmp / "hypotheses" / f"{split}.txt", utterances)
            per_split[split] = asdict(scoring.score(utterances))
            baseline = (dense_hypotheses or {}).get(split)
            significance = scoring.compare(utterances, baseline) if baseline is not None else None
            per_split[split]["p_value_vs_dense"] = significance.p_value if significance else None
            per_split[split]["z_vs_dense"] = significance.z if significance else None
            log.info("%s %s: WER %.4f CER %.4f (%d utterances)", info.trial, split, per_split[split]["wer"],
                     per_split[split]["cer"], per_split[split]["num_utterances"])

        metrics = _metrics(plain, info, layers, per_split)
        card = model_card(info, metrics, plain.config)
        for directory in ("model", "compact"):  # the compact store unpacks into the whole model directory
            (tmp / directory / "README.md").write_text(card)
        model_bytes, compact_bytes = export.dir_bytes(tmp / "model"), export.dir_bytes(tmp / "compact")
        metrics["artifact_bytes"] = {"model": model_bytes, "compact": compact_bytes}  # the card included
        metrics["compact_ratio"] = compact_bytes / (tmp / "model" / "model.safetensors").stat().st_size
        seconds["other"] = time.perf_counter() - started - sum(seconds.values())
        metrics["finalize_seconds"] = {key: round(value, 3) for key, value in seconds.items()}
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")  # last: the completion marker
    log.info("finalized %s", final)
    return metrics


def model_card(info: TrialInfo, metrics: dict, config) -> str:
    """``model/README.md`` in the Hugging Face Hub's format: YAML metadata (pipeline tag, base
    model, WER/CER per split as a ``model-index``), then what the model is and how to load it."""
    pruned_units = bool(getattr(config, pruned_modeling.PRUNED_KEY, None))
    dataset = Path(info.corpus.rstrip("/")).name if info.corpus else "evaluation corpus"
    results = [{"task": {"type": "automatic-speech-recognition", "name": "Speech recognition"},
                "dataset": {"name": dataset, "type": dataset, "split": split},
                "metrics": [{"type": "wer", "name": f"WER ({split})", "value": round(100 * metrics["wer"][split], 2)},
                            {"type": "cer", "name": f"CER ({split})", "value": round(100 * metrics["cer"][split], 2)}]}
               for split in metrics["wer"]]
    front = {"library_name": "transformers", "pipeline_tag": "automatic-speech-recognition",
             "tags": ["pinch-ray", "pruning", "sparsity", info.method],
             "model-index": [{"name": info.trial, "results": results}]}
    if info.base_model and not Path(info.base_model).exists() and "/" in info.base_model \
            and not storage.is_uri(info.base_model):  # a hub id
        front["base_model"] = info.base_model
    how = ("the method prunes nothing: the dense reference" if info.method == DENSE
           else f"`{info.method}` at {info.target_sparsity:g} of "
                f"{'all parameters' if info.target_basis == 'params' else 'the gated weights'}")
    load = ("from transformers import AutoModelForCTC, AutoProcessor\n\n"
            f"model = AutoModelForCTC.from_pretrained(path{', trust_remote_code=True' if pruned_units else ''})\n"
            "processor = AutoProcessor.from_pretrained(path)")
    rows = "\n".join(f"| {split} | {100 * metrics['wer'][split]:.2f} | {100 * metrics['cer'][split]:.2f} |"
                      for split in metrics["wer"])
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# {info.trial}\n\n"
            f"A CTC speech recognizer compressed by pinch_ray from "
            f"`{info.base_model or 'its starting model'}`: {how}. "
            f"{100 * metrics['param_reduction']:.1f}% of its {metrics['params_total']:,} parameters are zero "
            f"({metrics['compression_ratio']:.2f}x fewer nonzero)"
            + (", and pruned feed-forward neurons / heads / conv channels are removed from the matrices"
               if pruned_units else "") + ".\n\n"
            f"| split | WER (%) | CER (%) |\n|---|---|---|\n{rows}\n\n"
            f"Evaluated on {dataset} with greedy CTC decoding.\n\n"
            f"```python\n{load}\n```\n"
            + ("\nThe model's smaller layers need the loader shipped beside the weights "
               "(`modeling_pinch_ray_pruned.py`), hence `trust_remote_code=True`.\n" if pruned_units else ""))


def _metrics(plain, info: TrialInfo, layers, per_split: dict) -> dict:
    counts = count_parameters(plain)
    gated_numel, gated_pruned = sum(l.numel for l in layers), sum(l.pruned for l in layers)
    gated_sparsity = gated_pruned / gated_numel if gated_numel else 0.0
    return {
        "trial": info.trial,
        "method": info.method,
        "target_sparsity": info.target_sparsity,
        "target_basis": info.target_basis,
        "seed": info.seed,
        "dense_reference": info.dense_reference,
        # measured on the exported weights (never the configured value), on the target's basis:
        # pruned gated parameters over all parameters (params) or over the gated ones (gated)
        "achieved_sparsity": gated_sparsity if info.target_basis == "gated" else gated_pruned / counts.total,
        "gated_sparsity": gated_sparsity,
        # how mixed the per-layer allocation is: the parameter-weighted std of the layers' sparsities
        "layer_sparsity_std": (sum(l.numel * (l.sparsity - gated_sparsity) ** 2 for l in layers) / gated_numel) ** 0.5
        if gated_numel else 0.0,
        "achieved_sparsity_trained": info.achieved_sparsity_trained,
        "calibrated": info.calibrated,
        "params_total": counts.total,
        "params_nonzero": counts.nonzero,
        "param_reduction": counts.reduction,  # 1 - nonzero / total: every exact zero of the model
        "compression_ratio": counts.total / counts.nonzero,  # the paper's "4.26x"
        "wer": {split: s["wer"] for split, s in per_split.items()},
        "cer": {split: s["cer"] for split, s in per_split.items()},
        "p_value_vs_dense": {split: s["p_value_vs_dense"] for split, s in per_split.items()},
        "per_split": per_split,
        "compression_seconds": info.compression_seconds,
        "training_seconds": info.training_seconds,
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------------------
# Pipeline summary
# ----------------------------------------------------------------------------------------------


def collect_trials(output_dir: str | os.PathLike) -> list[dict]:
    """``metrics.json`` of every complete trial under ``output_dir``: the ``foundation`` the trials
    started from (if any), dense, then each method by target (sspg and sspg-neuron interleaved)."""
    trials = [json.loads(path.read_text()) for path in Path(output_dir).glob(f"*/{METRICS_FILE}")
              if export.TRIAL_NAME.fullmatch(path.parent.name) and storage.TMP_TAG not in path.parent.name]
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
    """One markdown table: a row per trial; parameters removed and compression ratio (measured on
    the export), WER (%) and p-value vs dense per split. Targets of the gated basis say so."""
    splits = list(dict.fromkeys(s for m in trials for s in m["wer"]))
    header = (["trial", "method", "target", "achieved", "params removed (%)", "compression",
               "params (M, nonzero / total)"]
              + [f"WER {s} (%)" for s in splits] + [f"p vs dense {s}" for s in splits] + ["time (s)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in trials:
        basis = "" if m.get("target_basis", "gated") == "params" or m["method"] == DENSE else " (gated)"
        target = "–" if m["method"] == DENSE else f"{m['target_sparsity']:.3g}{basis}"
        row = [m["trial"], m["method"], target, f"{m['achieved_sparsity']:.3f}",
               f"{100 * m['param_reduction']:.1f}", f"{m['compression_ratio']:.2f}x",
               f"{m['params_nonzero'] / 1e6:.3f} / {m['params_total'] / 1e6:.3f}"]
        row += [_number(None if m["wer"].get(s) is None else 100 * m["wer"][s], ".2f") for s in splits]
        row += [_number(m["p_value_vs_dense"].get(s), ".3g") for s in splits]
        row += [_number(m.get("compression_seconds"), ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    note = ("target, achieved: fraction of all parameters removed (achieved: measured on the exported "
            "model; \"(gated)\": of the gated weights only); compression: total / nonzero parameters; "
            "time: seconds of compression training (two-stage: the dense run it pruned, plus its own)")
    return "\n".join(lines) + "\n\n" + note + "\n"


SEEDED_TRIAL = re.compile(r"(?P<base>.+)-seed(?P<seed>\d+)")  # sweep.seeds: <trial>-seed<k>


def over_seeds(output_dir: str | os.PathLike, trials: Sequence[dict]) -> list[dict]:
    """Trials repeated over seeds (``<trial>-seed<k>``), one entry per ``<trial>``: the seeds, the
    WER per split as mean and sample std (:func:`mean_std`), parameters removed (mean), and per
    split a MAPSSWE test pooled over the seeds (each seed's hypotheses against its
    ``dense_reference``, the dense trial finalize compared it with;
    :func:`pinch_ray.core.scoring.compare_pooled`)."""
    groups: dict[str, list[dict]] = {}
    for m in trials:
        match = SEEDED_TRIAL.fullmatch(m["trial"])
        if match:
            groups.setdefault(match["base"], []).append(m)
    names = {m["trial"] for m in trials}
    out = []
    for base, members in groups.items():
        splits = list(dict.fromkeys(s for m in members for s in m["wer"]))
        entry = {"trial": base, "method": members[0]["method"], "target_sparsity": members[0]["target_sparsity"],
                 "target_basis": members[0].get("target_basis", "gated"), "seeds": [m.get("seed") for m in members],
                 "param_reduction": statistics.fmean(m["param_reduction"] for m in members),
                 "wer_mean": {}, "wer_std": {}, "p_value_pooled_vs_dense": {}}
        # (trial hypotheses, its reference's) per seed; none for the dense references themselves
        hypotheses = []
        for m in members:
            if m.get("dense_reference") in names:
                hypotheses.append((read_trial_hypotheses(Path(output_dir) / m["trial"]),
                                   read_trial_hypotheses(Path(output_dir) / m["dense_reference"])))
        for split in splits:
            entry["wer_mean"][split], entry["wer_std"][split] = mean_std(m["wer"][split] for m in members
                                                                         if split in m["wer"])
            pairs = [(system[split], baseline[split]) for system, baseline in hypotheses
                     if split in system and split in baseline]
            if pairs and len(pairs) == len(members):  # every seed has its comparison
                entry["p_value_pooled_vs_dense"][split] = scoring.compare_pooled(pairs).p_value
        out.append(entry)
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation of a group's values (seeds); the std is None for a single
    value: no spread was measured, which a table shows as the mean alone (not ``± 0.00``)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _wer_cell(entry: dict, split: str) -> str:
    """A group's WER on ``split`` in percent: ``mean ± std`` over its seeds, the mean alone where one
    seed has the split, ``–`` where none has."""
    if split not in entry["wer_mean"]:
        return "–"
    mean, std = entry["wer_mean"][split], entry["wer_std"][split]
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def over_seeds_table(groups: Sequence[dict]) -> str:
    """Markdown: a row per (method, target) repeated over seeds; WER mean ± std, pooled p."""
    splits = list(dict.fromkeys(s for g in groups for s in g["wer_mean"]))
    header = (["trial", "method", "target", "seeds", "params removed (%)"]
              + [f"WER {s} (%), mean ± std" for s in splits] + [f"pooled p vs dense {s}" for s in splits])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        target = "–" if g["method"] == DENSE else f"{g['target_sparsity']:.3g}"
        row = [g["trial"], g["method"], target, ", ".join(map(str, g["seeds"])),
               f"{100 * g['param_reduction']:.1f}"]
        row += [_wer_cell(g, s) for s in splits]
        row += [_number(g["p_value_pooled_vs_dense"].get(s), ".3g") for s in splits]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


PEER_REFERENCE = "sspg"  # the method every other is compared with in the peers table


def peers(output_dir: str | os.PathLike, trials: Sequence[dict]) -> list[dict]:
    """The methods side by side at each target where ``sspg`` ran beside another compression method:
    one entry per (method, target) (``sspg`` first), over its seeds (a trial without a seed counts as
    one), with WER mean and std per split, compression seconds, and per split a MAPSSWE test against
    sspg pooled over the seeds both ran (:func:`pinch_ray.core.scoring.compare_pooled`; below 0.05 the
    two differ significantly: the WER means say which way)."""
    groups: dict[tuple[str, float], dict] = {}
    for m in trials:
        if m["method"] != DENSE and m["trial"] != FOUNDATION_TRIAL:
            groups.setdefault((m["method"], m["target_sparsity"]), {})[m.get("seed")] = m
    out = []
    for target in sorted({target for method, target in groups if method == PEER_REFERENCE}):
        reference = groups[(PEER_REFERENCE, target)]
        methods = [method for method, t in groups if t == target]
        if len(methods) < 2:
            continue
        order = {m: i for i, m in enumerate(METHODS)}
        for method in sorted(methods, key=lambda m: (m != PEER_REFERENCE, order.get(m, len(order)))):
            members = groups[(method, target)]
            splits = list(dict.fromkeys(s for m in members.values() for s in m["wer"]))
            seconds = [m["compression_seconds"] for m in members.values() if m.get("compression_seconds") is not None]
            entry = {"method": method, "target_sparsity": target,
                     "seeds": sorted(members, key=lambda seed: -1 if seed is None else seed),
                     "param_reduction": statistics.fmean(m["param_reduction"] for m in members.values()),
                     "wer_mean": {}, "wer_std": {}, "p_value_pooled_vs_sspg": {},
                     "compression_seconds_mean": statistics.fmean(seconds) if seconds else None}
            shared = [seed for seed in members if seed in reference]
            hypotheses = ([(read_trial_hypotheses(Path(output_dir) / members[seed]["trial"]),
                            read_trial_hypotheses(Path(output_dir) / reference[seed]["trial"])) for seed in shared]
                          if method != PEER_REFERENCE else [])
            for split in splits:
                entry["wer_mean"][split], entry["wer_std"][split] = mean_std(m["wer"][split] for m in members.values()
                                                                             if split in m["wer"])
                pairs = [(system[split], baseline[split]) for system, baseline in hypotheses
                         if split in system and split in baseline]
                if pairs:
                    entry["p_value_pooled_vs_sspg"][split] = scoring.compare_pooled(pairs).p_value
            out.append(entry)
    return out


def peers_table(entries: Sequence[dict]) -> str:
    """Markdown: a row per (method, target) of :func:`peers`."""
    splits = list(dict.fromkeys(s for e in entries for s in e["wer_mean"]))
    header = (["target", "method", "seeds", "params removed (%)"] + [f"WER {s} (%), mean ± std" for s in splits]
              + [f"pooled p vs sspg {s}" for s in splits] + ["time (s), mean"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        row = [f"{e['target_sparsity']:.3g}", e["method"], ", ".join("–" if s is None else str(s) for s in e["seeds"]),
               f"{100 * e['param_reduction']:.1f}"]
        row += [_wer_cell(e, s) for s in splits]
        row += ["(reference)" if e["method"] == PEER_REFERENCE else _number(e["p_value_pooled_vs_sspg"].get(s), ".3g")
                for s in splits]
        row += [_number(e["compression_seconds_mean"], ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    note = ("each method against sspg at the same target, over the seeds both ran (MAPSSWE pooled over "
            "them); p < 0.05: the two differ significantly, the means say which way")
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot_wer_vs_params(path: str | os.PathLike, trials: Sequence[dict], split: str) -> None:
    """WER on ``split`` against nonzero parameters: one marker style per method, dense as reference
    (a dotted line), the ``foundation`` the trials started from as a grey cross. Trials repeated over
    seeds are one point: their mean, with the seeds' std as an error bar."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    start = [m for m in trials if m["trial"] == FOUNDATION_TRIAL and split in m["wer"]]
    if start:
        ax.plot([start[0]["params_nonzero"] / 1e6], [100 * start[0]["wer"][split]], marker="x", markersize=9,
                color="gray", linestyle="", label="start (foundation)")
    for method, marker in zip(METHODS, "*oDs^vPX", strict=True):
        groups: dict[str, list[dict]] = {}
        for m in trials:
            if m["method"] == method and split in m["wer"] and m["trial"] != FOUNDATION_TRIAL:
                seeded = SEEDED_TRIAL.fullmatch(m["trial"])
                groups.setdefault(seeded["base"] if seeded else m["trial"], []).append(m)
        if not groups:
            continue
        points = []
        for group in groups.values():
            mean, std = mean_std(100 * m["wer"][split] for m in group)
            points.append((statistics.fmean(m["params_nonzero"] / 1e6 for m in group), mean, std or 0.0))
        points.sort()
        x, y, spread = zip(*points)
        ax.errorbar(x, y, yerr=spread, marker=marker, markersize=10 if method == DENSE else 7, capsize=3,
                    label=method, linestyle="" if method == DENSE else "-")
        if method == DENSE:
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
    groups = over_seeds(output_dir, trials)
    compared = peers(output_dir, trials)
    summary = {"plot_split": split, "trials": trials, "over_seeds": groups, "peers": compared}
    text = f"# pinch_ray summary\n\n{summary_table(trials)}"
    if groups:
        text += f"\n## Over seeds\n\n{over_seeds_table(groups)}"
    if compared:
        text += f"\n## Peers\n\n{peers_table(compared)}"
    storage.write_text(output_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    storage.write_text(output_dir / SUMMARY_MD, text)
    with storage.atomic_path(output_dir / SUMMARY_PNG, keep_suffix=True) as tmp_png:  # matplotlib reads the suffix
        plot_wer_vs_params(tmp_png, trials, split)
    return summary
