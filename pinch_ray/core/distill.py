"""Distillation from the model a trial starts from: a frozen copy of it teaches the model being
compressed, on the same worker (``training.distill_*``).

Two terms, each with its own weight (0 turns it off):

* **output distribution** (``distill_logits``): KL(teacher || student) of the per-frame CTC
  distributions at temperature ``T`` (times ``T**2``, so the gradient scale does not depend on
  ``T``), averaged over the real frames. Only where the teacher's CTC head was trained: a
  pre-trained SSL checkpoint gets a fresh head (:func:`pinch_ray.core.models.load_model`), whose
  outputs teach nothing, so the term is dropped there (with a log line).
* **hidden states** (``distill_hidden``): on each layer of ``distill_layers`` (indices into the
  model's ``hidden_states``: 0 is the projected features, -1 the last layer), the L1 distance
  minus log sigmoid of the cosine similarity of student and teacher frames (DistilHuBERT's loss;
  pruning keeps the hidden size, so no projection is needed), averaged over the layers.

The teacher runs in eval mode under ``torch.no_grad``: one more forward pass per micro-batch, no
backward. It is not part of any checkpoint: a resumed run copies it again from its starting model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pinch_ray.core.models import frame_lengths

log = logging.getLogger(__name__)


@dataclass
class Distiller:
    """A frozen teacher and the weights of the two distillation terms (see the module docstring)."""

    teacher: nn.Module
    logits_weight: float = 0.0
    hidden_weight: float = 0.0
    layers: tuple[int, ...] = (-1,)
    temperature: float = 1.0

    @classmethod
    def create(cls, model: nn.Module, logits_weight: float, hidden_weight: float, layers=(), temperature: float = 1.0,
               teacher_has_head: bool = True) -> "Distiller | None":
        """A copy of ``model`` (as it is now: the start of the trial) as teacher; None when both
        weights are 0 (or only the logits term is asked for and the teacher has no trained head)."""
        if logits_weight and not teacher_has_head:
            log.info("distillation: the starting model's CTC head is new (no tokenizer in the checkpoint); "
                     "no output-distribution term, hidden states only")
            logits_weight = 0.0
        if not logits_weight and not hidden_weight:
            return None
        problems = layer_problems(model.config.num_hidden_layers, layers) if hidden_weight else []
        if problems:
            raise ValueError("; ".join(problems))
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
        return cls(teacher, float(logits_weight), float(hidden_weight), tuple(layers) or (-1,), float(temperature))

    @property
    def wants_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    def loss(self, student_out, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted distillation loss for one micro-batch and its terms (detached, for metrics).

        ``student_out``: the student's model output on ``inputs`` (``hidden_states`` included when
        :attr:`wants_hidden_states`); ``inputs``: what the student was given (labels are not used).
        """
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher_out = self.teacher(**teacher_inputs, output_hidden_states=self.wants_hidden_states)
        frames = _frame_mask(self.teacher, inputs.get("attention_mask"), student_out.logits)
        total = student_out.logits.new_zeros(())
        terms = {}
        if self.logits_weight:
            t = self.temperature
            student_log_p = F.log_softmax(student_out.logits.float() / t, dim=-1)
            teacher_log_p = F.log_softmax(teacher_out.logits.float() / t, dim=-1)
            per_frame = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1)
            terms["distill_logits"] = _masked_mean(per_frame, frames) * t * t
            total = total + self.logits_weight * terms["distill_logits"]
        if self.hidden_weight:
            per_layer = []
            for layer in self.layers:
                s, h = student_out.hidden_states[layer].float(), teacher_out.hidden_states[layer].float()
                per_frame = (s - h).abs().mean(-1) - F.logsigmoid(F.cosine_similarity(s, h, dim=-1))
                per_layer.append(_masked_mean(per_frame, frames))
            terms["distill_hidden"] = torch.stack(per_layer).mean()
            total = total + self.hidden_weight * terms["distill_hidden"]
        return total, {name: value.detach() for name, value in terms.items()}


def layer_problems(num_hidden_layers: int, layers) -> list[str]:
    """``training.distill_layers`` entries that are no index into ``hidden_states`` of a model
    with ``num_hidden_layers`` transformer layers (``num_hidden_layers + 1`` entries)."""
    bad = [layer for layer in layers if not -(num_hidden_layers + 1) <= layer <= num_hidden_layers]
    if not bad:
        return []
    return [f"training.distill_layers: {bad} out of range for a model with {num_hidden_layers} layers; "
            f"use 0..{num_hidden_layers} (0: the projected features) or -1 for the last"]


def _frame_mask(model: nn.Module, attention_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """[B, frames] bool, True on frames that come from real samples; None: every frame is real."""
    if attention_mask is None:
        return None
    lengths = frame_lengths(model, attention_mask)
    return torch.arange(logits.shape[1], device=logits.device)[None, :] < lengths[:, None]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp(min=1)
