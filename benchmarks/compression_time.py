"""One-pass compression (sspg, and the peers asked for with ``--peers``) against the two-stage
recipe: the time each needs to reach a common quality, over seeds.

Prints one JSON object:
    {"ratio_mean": ..., "ratio_std": ..., "ratios": [...], "seeds": [...], "runs": [{per seed}],
     "peers": {"gmp": {"ratio_vs_sspg_mean": ..., ...}}, ...}

From the same starting model (where the pipeline's compression trials start: by default the demo's
shipped foundation ``synth-tiny``), per seed:

- **one pass**: ``sspg`` fine-tuning at the target until dev WER (of the hard-pruned model) stops
  improving; the sparsity target ramps over ``--ramp-steps`` and stopping is only considered after.
  The gate settings are the pipeline's ``gates`` (its ramp replaced by ``--ramp-steps``).
- **two stage**: dense fine-tuning until dev WER stops improving, then ``ump`` (every gated matrix
  pruned to the target by |W|) and fine-tuning with the mask fixed until dev WER stops improving.
- **peers** (``--peers gmp movement parp``): each one pass as sspg, under the same ramp (parp is at
  the target from its first step), the same stopping rule and the same clock. They are timed to the
  quality sspg and two-stage have in common and do not set it: a peer that never gets there (its
  ``s_to_quality`` null) cannot lower the bar for the other arms.

Every stage uses the same constant learning rate after the same warm-up, evaluates the dev split
every ``--eval-every`` steps and stops after ``--patience`` evaluations without a new best of the
dev WER averaged over the last ``--smooth`` evaluations. Each arm records its smoothed dev WER
against its cumulative training seconds (evaluation excluded; the two-stage clock includes its
dense stage; only compressed models count: sspg after its ramp, two-stage in its second stage).
Seconds are CPU seconds of this process by default (``--clock cpu``: other work on a shared machine
barely moves them; ``--clock wall`` for elapsed time).
The figure is **time to a common quality**: the worse of sspg's and two-stage's best smoothed dev
WER, and the seconds each arm took to first reach it (:func:`seconds_to_common_quality`); ``ratio`` = one pass / two
stage, and per peer its seconds / sspg's (below 1: the peer reaches that quality sooner). So where a
stopping rule happens to end a run no longer decides the result. Test WERs are of each arm's kept
(best) model.
Runs in this process on the core API (no Ray), ``--threads`` torch threads.

    pinch-ray run pipelines/demo.yaml --only prepare    # once: the corpus and its prepared shards
    python benchmarks/compression_time.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from pinch_ray.config import GateConfig, PipelineConfig, TrainConfig, load_pipeline
from pinch_ray.data.batches import iter_train_batches, read_prepared_rows
from pinch_ray.core.scoring import score, transcribe_rows
from pinch_ray.core.models import load_model
from pinch_ray.pipeline.stages import compression_init_from, marker_path
from pinch_ray.core.compressor import Compressor


def stage_outputs(cfg: PipelineConfig, pipeline: Path, stage: str) -> dict:
    """What a finished ``stage`` of the pipeline recorded in its completion marker."""
    marker = marker_path(cfg.output_dir, stage)
    if not marker.is_file():
        hint = " (or pass --init-from)" if stage == "baseline" else ""
        raise SystemExit(f"{marker} not found: run `pinch-ray run {pipeline}` first{hint}")
    return json.loads(marker.read_text())["outputs"]


def dev_wer(model, processor, rows) -> float:
    with torch.no_grad():
        return score(transcribe_rows(model, processor, rows, batch_size=32)).wer


class Stage:
    """Train one Compressor until dev WER stops improving; keeps the best model seen."""

    def __init__(self, name: str, model, processor, method: str, target: float, args, train_rows, dev_rows,
                 gates: GateConfig):
        self.name, self.processor, self.args = name, processor, args
        self.train_rows, self.dev_rows = train_rows, dev_rows
        self.train_cfg = TrainConfig(max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                                     decay_fraction=0.0, threshold_lr=2.0 / args.ramp_steps, seed=args.seed)
        gate_cfg = dataclasses.replace(gates, target_warmup_fraction=args.ramp_steps / args.max_steps)
        self.run = Compressor.create(model, method, target, self.train_cfg, gate_cfg)
        self.min_steps = args.ramp_steps if method in ("sspg", "gmp", "movement") else 0  # at the target after

    def batches(self):
        epoch = 0
        while True:
            yield from iter_train_batches(self.train_rows, self.args.batch_size, seed=self.args.seed, epoch=epoch)
            epoch += 1

    def train(self) -> dict:
        seconds, best, best_state, best_step, curve = 0.0, float("inf"), None, 0, []
        recent, best_smoothed, stale = [], float("inf"), 0  # the stopping signal: a moving average
        batches = self.batches()
        while self.run.step_count < self.args.max_steps:
            clock = CLOCKS[self.args.clock]
            started = clock()
            for batch in islice(batches, self.args.eval_every):
                self.run.step([batch])
            seconds += clock() - started
            wer = dev_wer(self.run.model, self.processor, self.dev_rows)  # eval(): hard masks
            print(f"# {self.name} step {self.run.step_count}: dev WER {wer:.4f} ({seconds:.0f} s)", flush=True)
            if self.run.step_count < self.min_steps:  # sspg: not at the target yet, not a candidate
                continue
            if wer < best:
                best, best_state, best_step = wer, copy.deepcopy(self.run.unwrapped.state_dict()), self.run.step_count
            recent = (recent + [wer])[-self.args.smooth:]
            smoothed = sum(recent) / len(recent)
            curve.append([self.run.step_count, seconds, wer, smoothed])  # unrounded: the quality is read from it
            if smoothed < best_smoothed:
                best_smoothed, stale = smoothed, 0
            else:
                stale += 1
                if stale >= self.args.patience:
                    break
        self.run.unwrapped.load_state_dict(best_state)
        finish = self.run.finish()  # sspg: calibrated if the hard sparsity misses the target
        return {"seconds": seconds, "steps": self.run.step_count, "best_step": best_step, "dev_wer": best,
                "sparsity": finish["achieved_sparsity"], "curve": curve}


# cpu: the CPU seconds this process spends (all its threads), which other work on a shared machine
# barely changes, unlike wall time; with --threads 1 both read the same on an idle machine.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def seconds_to_reach(curve: list, quality: float, offset: float = 0.0) -> float | None:
    """The cumulative seconds (plus ``offset``) at which a ``[step, seconds, wer, smoothed]`` curve's
    smoothed dev WER first reaches ``quality`` or better; None if it never does."""
    return next((offset + seconds for _, seconds, _, smoothed in curve if smoothed <= quality), None)


def seconds_to_common_quality(arms: dict[str, tuple[list, float]]) -> tuple[float, dict[str, float]]:
    """``(quality, {arm: seconds})`` for arms ``{name: (curve, offset seconds)}``: the quality is the
    worst arm's best smoothed dev WER, read from the curves themselves, so every arm reaches it
    (a plateau kept apart from its curve, rounded, could miss it: the benchmark once crashed so).

    Raises:
        ValueError: an arm has an empty curve (it never got past its ramp).
    """
    empty = [name for name, (curve, _) in arms.items() if not curve]
    if empty:
        raise ValueError(f"arms {empty} recorded no dev WER after their ramp; raise --max-steps")
    quality = max(min(point[3] for point in curve) for curve, _ in arms.values())
    return quality, {name: seconds_to_reach(curve, quality, offset) for name, (curve, offset) in arms.items()}


def peer_time(curve: list, quality: float, sspg_seconds: float, two_stage_seconds: float) -> dict:
    """A peer's seconds to the quality sspg and two-stage have in common, and their ratios to theirs;
    all None when the peer never reaches it."""
    seconds = seconds_to_reach(curve, quality)
    if seconds is None:
        return {"s_to_quality": None, "ratio_vs_sspg": None, "ratio_vs_two_stage": None}
    return {"s_to_quality": round(seconds, 1), "ratio_vs_sspg": round(seconds / sspg_seconds, 3),
            "ratio_vs_two_stage": round(seconds / two_stage_seconds, 3)}


def summarize_peer(per_seed: list[dict]) -> dict:
    """Over seeds: the ratios to sspg, and their mean over the seeds where the peer reached the common
    quality (``reached`` of them; the mean is None where it never did)."""
    ratios = [seed["ratio_vs_sspg"] for seed in per_seed]
    reached = [ratio for ratio in ratios if ratio is not None]
    return {"ratios_vs_sspg": ratios, "reached": f"{len(reached)}/{len(ratios)}",
            "ratio_vs_sspg_mean": round(statistics.fmean(reached), 3) if reached else None,
            "ratio_vs_sspg_std": round(statistics.stdev(reached), 3) if len(reached) > 1 else None,
            "word_errors": sum(seed["word_errors"] for seed in per_seed)}


def rounded_curve(curve: list) -> list:
    return [[step, round(seconds, 2), round(wer, 4), round(smoothed, 4)] for step, seconds, wer, smoothed in curve]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=Path("pipelines/demo.yaml"),
                        help="a pipeline whose prepare (and baseline) stages have run: its corpus and foundation")
    parser.add_argument("--init-from", default=None, help="starting model (default: the pipeline's foundation)")
    parser.add_argument("--target", type=float, default=0.65, help="fraction of all parameters")
    parser.add_argument("--max-steps", type=int, default=2000, help="cap per stage")
    parser.add_argument("--ramp-steps", type=int, default=300, help="sspg: steps of the sparsity target ramp")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=3,
                        help="evaluations without a new best (smoothed) dev WER before stopping")
    parser.add_argument("--smooth", type=int, default=3,
                        help="the stopping signal averages this many latest dev WERs (1: no smoothing)")
    parser.add_argument("--dev-utterances", type=int, default=300, help="dev subset evaluated while training")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pair of arms per seed")
    parser.add_argument("--peers", nargs="*", default=[], choices=["gmp", "movement", "parp"],
                        help="one-pass peers timed beside sspg (each one arm more per seed)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="training seconds as CPU time of this process (default: robust to other load) "
                             "or wall time")
    args = parser.parse_args()
    for flag in ("max_steps", "ramp_steps", "eval_every", "patience", "smooth", "dev_utterances"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    torch.set_num_threads(args.threads)

    cfg = load_pipeline(args.pipeline, check_paths=False)
    splits = {split: entry["path"] for split, entry in stage_outputs(cfg, args.pipeline, "prepare").items()}
    train_rows = list(read_prepared_rows(splits[cfg.corpus.train_split]))
    dev_rows = list(islice(read_prepared_rows(splits[cfg.corpus.eval_splits[0]]), args.dev_utterances))
    test_rows = list(read_prepared_rows(splits[cfg.corpus.eval_splits[-1]]))
    # where the pipeline's compression trials start: the shipped foundation (pipelines/demo.yaml),
    # or the baseline's model when the pipeline trains its own (sweep.init_from_dense)
    baseline = stage_outputs(cfg, args.pipeline, "baseline") if cfg.sweep.init_from_dense else {}
    start = args.init_from or compression_init_from(cfg, {"baseline": baseline})

    def fresh():
        return load_model(start, **cfg.model.overrides)

    def run_seed(seed: int) -> dict:
        seeded = argparse.Namespace(**{**vars(args), "seed": seed})
        torch.manual_seed(seed)

        def stage(name: str, model, method: str, target: float) -> Stage:
            return Stage(f"seed {seed} {name}", model, processor, method, target, seeded, train_rows, dev_rows,
                         cfg.gates)

        model, processor = fresh()
        one = stage("one-pass sspg", model, "sspg", args.target).train()
        one_model = model
        model, _ = fresh()
        dense = stage("two-stage 1/2 dense", model, "dense", 0.0).train()
        pruned = stage("two-stage 2/2 ump", model, "ump", args.target)
        ump = pruned.train()
        peer_arms, peer_models = {}, {}
        for method in args.peers:
            peer_models[method], _ = fresh()
            peer_arms[method] = stage(f"one-pass {method}", peer_models[method], method, args.target).train()
        with torch.no_grad():
            one_test = score(transcribe_rows(one_model, processor, test_rows, batch_size=32))
            two_test = score(transcribe_rows(pruned.run.model, processor, test_rows, batch_size=32))
            peer_tests = {method: score(transcribe_rows(peer_models[method], processor, test_rows, batch_size=32))
                          for method in args.peers}
        quality, reached = seconds_to_common_quality(
            {"sspg": (one["curve"], 0.0), "two-stage": (ump["curve"], dense["seconds"])})
        one_s, two_s = reached["sspg"], reached["two-stage"]
        peers = {method: {**peer_time(arm["curve"], quality, one_s, two_s), "s_total": round(arm["seconds"], 1),
                          "best_smoothed_dev_wer": round(min(p[3] for p in arm["curve"]), 4),
                          "wer": round(peer_tests[method].wer, 4),
                          "word_errors": round(peer_tests[method].wer * peer_tests[method].num_words),
                          "sparsity": round(arm["sparsity"], 4), "steps": arm["steps"],
                          "dev_curve": rounded_curve(arm["curve"])}
                 for method, arm in peer_arms.items()}
        return {
            "seed": seed, "common_dev_wer": round(quality, 4), "peers": peers,
            "one_pass_s_to_quality": round(one_s, 1), "two_stage_s_to_quality": round(two_s, 1),
            "ratio": round(one_s / two_s, 3),
            "one_pass_s_total": round(one["seconds"], 1),
            "two_stage_s_total": round(dense["seconds"] + ump["seconds"], 1),
            "one_pass_best_smoothed_dev_wer": round(min(p[3] for p in one["curve"]), 4),
            "two_stage_best_smoothed_dev_wer": round(min(p[3] for p in ump["curve"]), 4),
            "one_pass_wer": round(one_test.wer, 4), "two_stage_wer": round(two_test.wer, 4),
            # the WERs as word error counts over the same reference words: ties are exact
            "one_pass_word_errors": round(one_test.wer * one_test.num_words),
            "two_stage_word_errors": round(two_test.wer * two_test.num_words),
            "one_pass_sparsity": round(one["sparsity"], 4), "two_stage_sparsity": round(ump["sparsity"], 4),
            "one_pass_steps": one["steps"], "two_stage_steps": [dense["steps"], ump["steps"]],
            # [step, cumulative training seconds, dev WER, smoothed dev WER]; two-stage: + its dense stage
            "one_pass_dev_curve": rounded_curve(one["curve"]), "two_stage_dense_seconds": round(dense["seconds"], 1),
            "two_stage_dev_curve": rounded_curve(ump["curve"]),
        }

    runs = [run_seed(seed) for seed in args.seeds]
    ratios = [run["ratio"] for run in runs]
    peers = {method: summarize_peer([run["peers"][method] for run in runs]) for method in args.peers}
    print(json.dumps({
        "ratio_mean": round(statistics.fmean(ratios), 3),
        "ratio_std": round(statistics.stdev(ratios), 3) if len(ratios) > 1 else 0.0,
        "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
        "ratio_of_summed_seconds": round(sum(r["one_pass_s_to_quality"] for r in runs)
                                         / sum(r["two_stage_s_to_quality"] for r in runs), 3),
        "one_pass_word_errors": sum(r["one_pass_word_errors"] for r in runs),
        "two_stage_word_errors": sum(r["two_stage_word_errors"] for r in runs),
        "peers": peers, "seeds": args.seeds, "target_sparsity": args.target, "target_basis": "params", "start": start,
        "test_utterances": len(test_rows), "dev_utterances": len(dev_rows), "eval_every": args.eval_every,
        "patience": args.patience, "smooth": args.smooth, "threads": args.threads, "clock": args.clock,
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
