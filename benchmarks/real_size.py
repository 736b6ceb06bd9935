"""The paper's pipelines at full size on this machine: HuBERT-large and wav2vec2-base stand-ins.

Each model is the real architecture at full size with random weights, laid out as on the hub (no CTC
head, no tokenizer): ``facebook/hubert-large-ll60k`` (316M parameters, conv layer norm, stable layer
norm) and ``facebook/wav2vec2-base`` (94.4M). ``pinch-ray run`` runs the shipped YAML end to end on a
small synthetic corpus with a few CPU steps per trial (dense baseline, sspg and ump at 0.65 of all
parameters), as a subprocess whose process tree (the driver and every Ray worker) is sampled for
memory. Prints one JSON object: per model, the run's seconds and peak RSS, dense and sspg step
seconds (medians of the logged steps after the first), and per trial the parameters removed and the
seconds finalize spent on export, compact storage, evaluation and the rest. Outputs are removed.

    python benchmarks/real_size.py                         # both models (~15 min on 2 cores)
    python benchmarks/real_size.py --models wav2vec2-base --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray  # noqa: F401 - puts the psutil Ray bundles (ray/thirdparty_files) on sys.path
import psutil  # noqa: E402
from transformers import (HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor,
                          Wav2Vec2ForPreTraining)

ROOT = Path(__file__).resolve().parents[1]


def hubert_large(directory: Path) -> None:
    """``facebook/hubert-large-ll60k``'s architecture (its hub config's sizes), random weights."""
    config = HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    HubertModel(config).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(directory)


def wav2vec2_base(directory: Path) -> None:
    Wav2Vec2ForPreTraining(Wav2Vec2Config()).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(directory)


MODELS = {"hubert-large": ("hubert_large_ls100.yaml", hubert_large),
          "wav2vec2-base": ("wav2vec2_base_ls100.yaml", wav2vec2_base)}


def peak_rss_while(process: subprocess.Popen) -> dict:
    """Sample the summed RSS of ``process`` and its descendants every 0.5 s until it exits."""
    peak = {"bytes": 0}

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak["bytes"] = max(peak["bytes"], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return peak


def step_seconds(log: Path) -> float | None:
    steps = [json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip()][1:]
    return round(statistics.median(steps), 3) if steps else None


def run_model(name: str, work: Path, steps: int, utterances: int) -> dict:
    yaml_name, build = MODELS[name]
    checkpoint = work / name
    build(checkpoint)
    out = work / f"out-{name}"
    command = [sys.executable, "-m", "pinch_ray.cli", "run", str(ROOT / "pipelines" / yaml_name),
               f"model.init_from={checkpoint}", f"corpus.root={work / 'corpus'}",
               f"corpus.synth_utterances={utterances}",
               "corpus.layout=auto", "corpus.train_split=train", "corpus.eval_splits=[test]",
               f"data.cache_dir={work / 'cache'}", f"output_dir={out}", f"training.max_steps={steps}",
               "training.batch_size=2", "training.grad_accum_steps=1", "training.warmup_steps=1",
               "training.report_every=1", f"training.checkpoint_every={steps}", "training.eval_every=0",
               "training.torch_threads=1", "resources.num_workers=1", "resources.use_gpu=false",
               "resources.cpus_per_worker=0.5", "sweep.target_sparsities=[0.65]", "sweep.method_targets={ump: [0.65]}",
               "evaluation.batch_size=4", "evaluation.num_actors=0"]
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    with open(work / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        peak = peak_rss_while(process)
        code = process.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        log_tail = (work / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"{name}: pinch-ray run failed (exit {code}); the end of its log:\n{log_tail}")
    trials = {}
    for metrics_file in sorted(out.glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        trials[metrics["trial"]] = {"param_reduction": round(metrics["param_reduction"], 4),
                                    "params_total": metrics["params_total"],
                                    "finalize_seconds": metrics["finalize_seconds"],
                                    "finalize_non_eval_seconds": round(sum(
                                        v for k, v in metrics["finalize_seconds"].items() if k != "evaluation"), 2)}
    dense, sspg = step_seconds(out / "logs" / "dense.jsonl"), step_seconds(out / "logs" / "sspg-0.65.jsonl")
    return {"run_seconds": round(seconds, 1), "peak_rss_gb": round(peak["bytes"] / 1e9, 2),
            "dense_step_s": dense, "sspg_step_s": sspg, "sspg_dense_ratio": round(sspg / dense, 3) if dense else None,
            "trials": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per trial (batch 2)")
    parser.add_argument("--utterances", type=int, default=40, help="synthetic corpus size (80/10/10 split)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pinch-real-size-") as work:
        result = {name: run_model(name, Path(work), args.steps, args.utterances) for name in args.models}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
