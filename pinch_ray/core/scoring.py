"""Scoring: greedy CTC decoding, WER / CER (jiwer), a significance test, hypotheses files.

Decoding is greedy: argmax per frame, repeats collapsed, the blank (the tokenizer's pad token)
dropped, ``|`` read as a space. Frames past an utterance's end (padding) are ignored.
:func:`transcribe_rows` transcribes shard rows in this process (any iterable of rows, or a
dataset streamed to the caller); :mod:`pinch_ray.pipeline.transcribe` runs the same
:func:`transcribe_batch` on a Ray actor pool.

Significance: MAPSSWE, the NIST matched-pairs sentence-segment word error test (Gillick & Cox 1989,
sclite's ``MP`` test), the test speech compression papers report ("no statistically significant
WER increase"). The per-segment differences of word-error counts of two systems on the same
references, ``d_i = e_a_i - e_b_i``, give ``Z = mean(d) / (std(d) / sqrt(n))``, and the two-sided
p-value under the normal approximation. Segments here are whole utterances (sclite additionally
cuts utterances at words both systems got right, which gives more, shorter segments); utterances
are independent by construction, which is the test's assumption, and LibriSpeech test sets have
2,600+ of them, ample for the normal approximation.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch

from pinch_ray.core.models import frame_lengths
from pinch_ray.data.batches import iter_eval_batches

log = logging.getLogger(__name__)

HYPOTHESES_HEADER = "id\treference\thypothesis"


@dataclass(frozen=True)
class Utterance:
    """One transcribed utterance: its id, reference and hypothesis (upper case, single spaces)."""

    id: str
    reference: str
    hypothesis: str


# ----------------------------------------------------------------------------------------------
# Decoding and inference
# ----------------------------------------------------------------------------------------------


def greedy_decode(logits: torch.Tensor, frame_lengths: torch.Tensor | None, tokenizer) -> list[str]:
    """Greedy CTC decoding of ``logits`` [B, T, V] with ``frame_lengths`` [B] valid frames each.

    Returns B strings: repeats collapsed, blank (``tokenizer.pad_token_id``) and other special
    tokens dropped, word delimiters as single spaces.
    """
    token_ids = logits.argmax(dim=-1).cpu()
    texts = []
    for i, ids in enumerate(token_ids):
        if frame_lengths is not None:
            ids = ids[: int(frame_lengths[i])]
        collapsed = torch.unique_consecutive(ids)
        collapsed = collapsed[collapsed != tokenizer.pad_token_id]
        # Blank already removed after collapsing, so skipping special tokens is safe now.
        text = tokenizer.decode(collapsed.tolist(), skip_special_tokens=True, group_tokens=False)
        texts.append(" ".join(text.split()))
    return texts


@torch.inference_mode()
def transcribe_batch(model, processor, batch: Mapping[str, Any]) -> list[str]:
    """Hypotheses of one padded batch (``pinch_ray.data.batches.collate`` format).

    ``input_values`` [B, T] float32 16 kHz audio and ``attention_mask`` [B, T] (1 = real sample).
    The mask goes to the model only if ``processor.feature_extractor.return_attention_mask``
    (wav2vec2-base style group-norm models are trained without it); it always bounds decoding.
    """
    device = next(model.parameters()).device
    inputs = {"input_values": batch["input_values"].to(device)}
    if processor.feature_extractor.return_attention_mask:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    logits = model(**inputs).logits
    return greedy_decode(logits.float(), frame_lengths(model, batch["attention_mask"]), processor.tokenizer)


def transcribe_rows(model, processor, source: Any, batch_size: int = 16) -> list[Utterance]:
    """Transcribe every utterance of ``source`` in this process; returns them sorted by id.

    ``source``: an iterable of shard rows (``id``, ``audio``, ``labels``, ``text``) or a Ray
    Dataset (streamed to this process). The model is put in ``eval()`` mode (hard masks if gated).
    """
    model.eval()
    out = []
    for batch in iter_eval_batches(source, batch_size):
        hypotheses = transcribe_batch(model, processor, batch)
        out.extend(Utterance(i, r, h) for i, r, h in zip(batch["ids"], batch["texts"], hypotheses))
    return sorted(out, key=lambda u: u.id)


# ----------------------------------------------------------------------------------------------
# Scores and the significance test
# ----------------------------------------------------------------------------------------------


@dataclass
class SplitScores:
    wer: float  # word error rate over the split: (S + D + I) / reference words
    cer: float  # character error rate, same over characters (spaces included)
    num_utterances: int
    num_words: int  # reference words


def score(utterances: Sequence[Utterance]) -> SplitScores:
    """Corpus-level WER and CER (jiwer) of a split.

    Raises:
        ValueError: no utterances.
    """
    if not utterances:
        raise ValueError("score: no utterances to score")
    references = [u.reference for u in utterances]
    hypotheses = [u.hypothesis for u in utterances]
    words = jiwer.process_words(references, hypotheses)
    return SplitScores(wer=float(words.wer), cer=float(jiwer.cer(references, hypotheses)),
                       num_utterances=len(utterances), num_words=sum(len(r) for r in words.references))


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """Word errors (substitutions + deletions + insertions) per utterance: int64 [N]."""
    alignments = jiwer.process_words(list(references), list(hypotheses)).alignments
    errors = np.zeros(len(alignments), dtype=np.int64)
    for i, chunks in enumerate(alignments):
        for chunk in chunks:
            if chunk.type != "equal":
                errors[i] += max(chunk.ref_end_idx - chunk.ref_start_idx, chunk.hyp_end_idx - chunk.hyp_start_idx)
    return errors


@dataclass
class Significance:
    p_value: float  # two-sided; 1.0 when the two systems make the same number of errors everywhere
    z: float  # mean difference / its standard error; positive = system a makes more errors
    mean_difference: float  # mean over segments of errors(a) - errors(b), words per utterance
    num_segments: int


def mapsswe(references: Sequence[str], hypotheses_a: Sequence[str], hypotheses_b: Sequence[str]) -> Significance:
    """MAPSSWE of system a against system b on the same references (utterances as segments).

    Raises:
        ValueError: the three lists differ in length, or are empty.
    """
    if not len(references) == len(hypotheses_a) == len(hypotheses_b) or not references:
        raise ValueError(f"mapsswe: need equally long, non-empty lists (got {len(references)} references, "
                         f"{len(hypotheses_a)} and {len(hypotheses_b)} hypotheses)")
    differences = (word_errors(references, hypotheses_a) - word_errors(references, hypotheses_b)).astype(float)
    n, mean = len(differences), float(differences.mean())
    std = float(differences.std(ddof=1)) if n > 1 else 0.0
    if std == 0.0:  # every segment differs by the same amount: certain if nonzero, no evidence if zero
        return Significance(p_value=1.0 if mean == 0 else 0.0, z=0.0 if mean == 0 else math.copysign(math.inf, mean),
                            mean_difference=mean, num_segments=n)
    z = mean / (std / math.sqrt(n))
    return Significance(p_value=math.erfc(abs(z) / math.sqrt(2)), z=z, mean_difference=mean, num_segments=n)


def compare(system: Sequence[Utterance], baseline: Sequence[Utterance]) -> Significance:
    """:func:`mapsswe` of ``system`` against ``baseline``, matched by utterance id.

    Raises:
        ValueError: the two do not cover the same utterance ids.
    """
    return compare_pooled([(system, baseline)])


def compare_pooled(pairs: Sequence[tuple[Sequence[Utterance], Sequence[Utterance]]]) -> Significance:
    """:func:`mapsswe` over the segments of several (system, baseline) pairs together, e.g. one
    pair per seed (each seed's trial against the dense reference of its seed): every utterance of
    every pair is one segment, matched by id within its pair.

    Raises:
        ValueError: no pairs, or a pair whose two sides do not cover the same utterance ids.
    """
    if not pairs:
        raise ValueError("compare_pooled: no (system, baseline) pairs")
    references, system_hypotheses, baseline_hypotheses = [], [], []
    for system, baseline in pairs:
        baseline_by_id = {u.id: u for u in baseline}
        if set(baseline_by_id) != {u.id for u in system}:
            raise ValueError("compare: the system and the baseline were not evaluated on the same utterances")
        references += [u.reference for u in system]
        system_hypotheses += [u.hypothesis for u in system]
        baseline_hypotheses += [baseline_by_id[u.id].hypothesis for u in system]
    return mapsswe(references, system_hypotheses, baseline_hypotheses)


# ----------------------------------------------------------------------------------------------
# Hypothesis files: TSV with a header, one utterance per line
# ----------------------------------------------------------------------------------------------


def write_hypotheses(path: str | os.PathLike, utterances: Iterable[Utterance]) -> None:
    """``id<TAB>reference<TAB>hypothesis`` lines under a header (texts hold no tabs)."""
    lines = [HYPOTHESES_HEADER] + [f"{u.id}\t{u.reference}\t{u.hypothesis}" for u in utterances]
    Path(path).write_text("\n".join(lines) + "\n")


def read_hypotheses(path: str | os.PathLike) -> list[Utterance]:
    """Read a file written by :func:`write_hypotheses`.

    Raises:
        ValueError: the header or a line is malformed.
    """
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0] != HYPOTHESES_HEADER:
        raise ValueError(f"{path}: not a hypotheses file (expected the header {HYPOTHESES_HEADER!r})")
    out = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 3 tab-separated fields, got {len(fields)}")
        out.append(Utterance(*fields))
    return out
