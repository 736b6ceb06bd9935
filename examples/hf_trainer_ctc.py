"""Compress a CTC model inside a transformers Trainer script: sspg (or any method) to a target.

A plain fine-tuning script, as transformers' run_speech_recognition_ctc.py is, plus the three lines
marked ``pinch_ray``, on the synthetic speech corpus (espeak-ng, offline) and the shipped foundation
``synth-tiny``; about 2 minutes on 2 CPU cores (600 steps of 8 utterances)::

    pip install -e ".[hf]"
    python examples/hf_trainer_ctc.py                                  # sspg, 65% fewer parameters
    python examples/hf_trainer_ctc.py --method gmp --target 0.5 --output-dir runs/hf-gmp

Killed, the same command resumes from the last checkpoint under ``--output-dir``. The compressed
model is written to ``<output-dir>/pruned``, which stock ``AutoModelForCTC`` loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jiwer
import numpy as np
import soundfile
import torch
from transformers import AutoModelForCTC, AutoProcessor, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from pinch_ray.core.models import checkpoint_path
from pinch_ray.data.synth import generate_corpus
from pinch_ray.hf import attach  # pinch_ray


def read_split(root: Path, split: str, processor) -> list[dict]:
    """A LibriSpeech-layout split as model inputs: ``input_values`` (normalised 16 kHz audio) and
    ``labels`` (character ids), plus the transcript."""
    rows = []
    for transcripts in sorted((root / split).rglob("*.trans.txt")):
        for line in transcripts.read_text().splitlines():
            utterance, text = line.split(" ", 1)
            audio, rate = soundfile.read(transcripts.parent / f"{utterance}.flac", dtype="float32")
            rows.append({"input_values": processor(audio, sampling_rate=rate).input_values[0],
                         "labels": processor.tokenizer(text).input_ids, "text": text})
    return rows


class CTCCollator:
    """Pads audio with zeros and labels with -100 (ignored by the CTC loss)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.processor.pad({"input_values": [row["input_values"] for row in rows]}, return_tensors="pt")
        labels = self.processor.tokenizer.pad({"input_ids": [row["labels"] for row in rows]}, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        return batch


def word_error_rate(model, processor, rows: list[dict], batch_size: int = 16) -> float:
    """Greedy CTC decoding of ``rows``; WER against their transcripts."""
    model.eval()
    hypotheses = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = processor.pad({"input_values": [row["input_values"] for row in chunk]}, return_tensors="pt")
            hypotheses += processor.batch_decode(model(**batch).logits.argmax(-1))
    return jiwer.wer([row["text"] for row in rows], hypotheses)


def build_trainer(args: argparse.Namespace, train: list[dict], processor) -> Trainer:
    """The Trainer of an ordinary fine-tuning script."""
    model = AutoModelForCTC.from_pretrained(checkpoint_path(args.foundation))
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=args.max_steps // 10, lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=args.logging_steps, save_steps=args.save_steps, save_total_limit=2, report_to=args.report_to,
        seed=args.seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    return Trainer(model=model, args=training_args, train_dataset=train, data_collator=CTCCollator(processor),
                   processing_class=processor)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sspg", help="sspg, sspg-neuron, ump, gmp, movement, parp, dense")
    parser.add_argument("--target", type=float, default=0.65, help="fraction of all parameters to remove")
    parser.add_argument("--foundation", default="synth-tiny", help="a shipped foundation, or a model directory")
    parser.add_argument("--corpus", default=".cache/synth/hf-example", help="where the synthetic corpus is written")
    parser.add_argument("--utterances", type=int, default=800, help="synthetic utterances (80%% train, 10%% dev)")
    parser.add_argument("--output-dir", default="runs/hf-example", help="Trainer checkpoints, and pruned/")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--save-steps", type=int, default=200)
    parser.add_argument("--report-to", default="tensorboard", help="none, tensorboard, wandb, ...")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    processor = AutoProcessor.from_pretrained(checkpoint_path(args.foundation))
    generate_corpus(args.corpus, num_utterances=args.utterances, seed=args.seed, progress=False)
    train, dev = (read_split(Path(args.corpus), split, processor) for split in ("train", "dev"))

    trainer = build_trainer(args, train, processor)
    pinch = attach(trainer, args.method, target_sparsity=args.target)  # pinch_ray
    trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir()
                  else None)
    pinch.save_pretrained(Path(args.output_dir) / "pruned", processor)  # pinch_ray: at the target, stock format

    result = {"method": args.method, "target": args.target, **pinch.finished,
              "dev_wer": word_error_rate(trainer.model, processor, dev)}
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    main()
