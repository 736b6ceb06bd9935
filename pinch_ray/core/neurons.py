"""Neuron-granularity self-pinching gates: whole feed-forward neurons and attention heads.

Weight-level gates (:mod:`pinch_ray.core.gates`) cut parameter counts, but a dense kernel runs a
sparse matrix just as slowly. With ``GateConfig.granularity = "neuron"`` the gated units are the
feed-forward intermediate neurons and the attention heads of every transformer layer, so the
exported model has smaller matrices and runs faster on stock hardware.

Per layer and kind of unit there is still ONE learnable threshold. A unit's score is the mean
squared weight of the rows that produce it, ``||w_row||^2 / fan_in`` (a neuron: its row of
``intermediate_dense``; a head: its ``head_dim`` rows of ``q_proj``, ``k_proj`` and ``v_proj``
together), normalised per layer by the mean score ``s_l`` (treated as a constant for gradients,
as in :mod:`pinch_ray.core.gates`), and the soft mask is

    M_u = sigmoid((score_u / s_l - threshold_l^2) / (2 tau))

with the same annealed ``tau``. A layer's units score alike (relative scores within 0.5-1.6 on the
trained synth-tiny, where a layer's weights spread from 0 to ~10), so the weights' initial threshold
(``gates.threshold_init``, 0.1: ``t^2`` = 0.01) would sit far below every unit, every soft mask
saturated at exactly 1 and the sparsity term's gradient on the threshold exactly 0: measured on the
demo's setting (synth-tiny, 350 steps, 0.5 of all parameters), training reached 3.8% and
calibration cut the rest at once, 137% test WER. Each unit gate's threshold therefore starts just
under its layer's lowest unit score (:data:`UNIT_THRESHOLD_START`), where the lowest units are
inside the sigmoid; and the soft mask keeps a layer's best-scoring unit whole, as the hard mask
does. The same run then trained to the target by itself and ended at 7.8% (docs/lab-notebook.md,
"Smaller and faster"; dense 3.6%).

With a cold mask the sigmoid's band is narrow: at the starting threshold 3 of synth-tiny's 576
first-layer neurons are inside it, so the loss says nothing about the others until the threshold
reaches them. ``gates.unit_noise`` adds logistic noise to every score in the training forward (a
fresh draw per step, none in evaluation): near-binary unit masks are sampled around the threshold,
so units near it are dropped now and then and their rows learn what dropping them costs (314 of
the 576 reached in 20 draws at noise 0.1) -- what DPHuBERT's hard-concrete gates get from their
noise, here with the self-pinching score and the single threshold kept.

The mask multiplies the unit's output, i.e. the matching input columns of the next layer
(``output_dense`` for a neuron, the head's ``head_dim`` columns of ``out_proj``): it is a
parametrization of that weight, so the train/eval (soft/hard) behaviour,
:func:`pinch_ray.core.gates.gate_mode`, DDP and checkpoints work exactly as for weight gates.
Gradients reach the threshold and, through the score, the unit's rows: a unit under the threshold
pinches itself off.

The sparsity-aware objective is unchanged (:func:`pinch_ray.core.gates.soft_sparsity`), with each unit counted by
the parameters it carries: a neuron its ``intermediate_dense`` row and bias and its ``output_dense``
column; a head its q/k/v rows and biases and its ``out_proj`` columns. Hard mask: the units with
``score_u / s_l > threshold_l^2``; a layer always keeps its best-scoring unit (wav2vec2 attention
cannot run with zero heads), in the soft mask too.

:func:`pinch_ray.core.gates.fold` then removes the pruned units physically (:meth:`NeuronGate.remove_units`) and
records the per-layer sizes in the config for :mod:`pinch_ray.core.pruned_modeling`.

Unit kinds (``GateConfig.neuron_units``; ``[auto]`` takes every kind the model supports): ``ffn``
and ``heads`` as above (heads for wav2vec2/HuBERT-style attention; WavLM computes a gated position
bias per head from the layer input, so its heads stay), and ``conv``: the output channels of the
conv feature encoder's layers but the last (:class:`ConvChannelGate`), for encoders that normalise
each channel on their own (``feat_extract_norm: group``). On a CPU the conv encoder is about a
third of a base-size model's inference time, and a channel removed shrinks two convolutions.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from pinch_ray.config import ConfigError
from pinch_ray.core.masks import ThresholdGate, unmasked_weight
from pinch_ray.core.pruned_modeling import resized_linear, unit_parameters

LAYER_PATTERN = re.compile(r".*encoder\.layers\.\d+")
# A unit gate's threshold starts at sqrt(this x its layer's lowest relative unit score) (or at
# gates.threshold_init, if higher): see the module docstring.
UNIT_THRESHOLD_START = 0.9
log = logging.getLogger(__name__)


class UnitGate(ThresholdGate):
    """A gate over whole units (neurons, heads, conv channels) of one layer: one threshold, a score
    per unit, a mask per unit spread over the columns of the ``weight`` it parametrizes (the one
    that reads the units). Subclasses say where the units live (:attr:`sources`), how the unit mask
    lands on that weight (:meth:`spread`), what a unit carries (:meth:`kept_params`) and how the
    units leave the model (:meth:`remove_units`)."""

    counts_by_score = False  # unit sizes differ (heads beside neurons) or depend on other gates (conv)

    def __init__(self, kind: str, num_units: int, width: int, numel: int, threshold_init: float, tau: float):
        super().__init__(threshold_init, tau, numel)
        self.kind, self.num_units, self.width = kind, num_units, width
        self.noise = 0.0  # gates.unit_noise: logistic noise on the scores of the training forward

    def refer(self, **modules) -> None:
        """Keep plain references to model modules: not submodules, so not in ``state_dict``."""
        for name, module in modules.items():
            object.__setattr__(self, name, module)

    @property
    def sources(self) -> list[nn.Module]:
        """The modules whose rows (output channels) make the units."""
        raise NotImplementedError

    def spread(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``weight`` times the unit ``mask`` [num_units], spread over the columns each unit feeds."""
        raise NotImplementedError

    def kept_params(self, mask: torch.Tensor, soft: bool = True) -> torch.Tensor:
        """Parameters the units keep under ``mask`` (``soft``, or the 0/1 hard mask), differentiably."""
        raise NotImplementedError

    def remove_units(self, target: nn.Module, keep: torch.Tensor) -> None:
        """Fold: drop this gate and slice the units not in ``keep`` out of their matrices, in place."""
        raise NotImplementedError

    def relative_scores(self) -> torch.Tensor:
        """``score_u / s_l`` for every unit (differentiable in the source weights; ``s_l`` constant)."""
        # the sources' own weights: a conv layer that is also the target of the previous layer's
        # gate is scored without that gate, so each gate's units depend on its own layer only
        rows = torch.cat([raw_weight(m).reshape(self.num_units, -1) for m in self.sources], dim=1)
        scores = rows.float().pow(2).mean(dim=1)
        return scores / scores.detach().mean().clamp_min(1e-30)

    def unit_soft_mask(self, sample: bool = False) -> torch.Tensor:
        """The soft mask of every unit; the best-scoring one is kept whole, as the hard mask keeps it
        (else the sparsity term would count a last head as prunable that no hard mask removes).

        ``sample`` (the training forward, with ``gates.unit_noise`` > 0): each score gets its own
        draw of logistic noise, ``noise * logit(u)``, ``u ~ U(0, 1)``, so units near the threshold
        are dropped now and then and the loss says what each costs."""
        scores = self.relative_scores()
        z = scores - self.threshold.float().pow(2)
        if sample and self.noise > 0:
            u = torch.rand_like(scores).clamp_(1e-6, 1 - 1e-6)
            z = z + self.noise * (u.log() - torch.log1p(-u))
        mask = torch.sigmoid(z / (2 * self.tau))
        return mask.index_fill(0, scores.detach().argmax().view(1), 1.0)

    @torch.no_grad()
    def unit_hard_mask(self) -> torch.Tensor:
        """bool [num_units]: the units kept (at least one)."""
        scores = self.relative_scores()
        keep = scores > self.threshold.float().pow(2)
        if not keep.any():
            keep[scores.argmax()] = True
        return keep

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.is_soft():
            mask = self.unit_soft_mask(sample=self.training)
            self.last_mask_sum = self.kept_params(mask)
        else:
            mask = self.unit_hard_mask()
        return self.spread(weight, mask.to(weight.dtype))

    def fresh_mask_sum(self, module: nn.Module) -> torch.Tensor:
        return self.kept_params(self.unit_soft_mask())

    def weight_hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The columns (input channels) of the units the hard mask removes."""
        return self.spread(torch.ones_like(weight), self.unit_hard_mask().to(weight.dtype)).bool()

    @torch.no_grad()
    def hard_counts(self, module: nn.Module | None = None) -> tuple[int, int]:
        """(parameters the units carry, parameters of the pruned units)."""
        return self.numel, self.numel - round(float(self.kept_params(self.unit_hard_mask().float(), soft=False)))

    @torch.no_grad()
    def parameter_counts(self, module: nn.Module) -> tuple[set[int], int, int, int]:
        """The units' parameters stay plain model parameters (counted as such); only the pruned
        ones come off ``nonzero``."""
        numel, pruned = self.hard_counts(module)
        return set(), 0, numel, -pruned

    @torch.no_grad()
    def calibration_values(self, module: nn.Module | None = None) -> tuple[torch.Tensor, int, int]:
        """Sorted relative scores, parameters per unit, most units that may be pruned."""
        return self.relative_scores().detach().sort().values, self.unit_params, self.num_units - 1

    def fold_plan(self, module: nn.Module) -> torch.Tensor:
        return self.unit_hard_mask()

    def fold(self, module: nn.Module, plan: torch.Tensor) -> None:
        self.remove_units(module, plan)


class NeuronGate(UnitGate):
    """Feed-forward neurons (``ffn``) or attention heads (``heads``) of one transformer layer,
    gated on the weight that reads them (``output_dense`` / ``out_proj``).

    ``owner``: the feed-forward or attention module holding the source and target Linear layers.
    ``numel``: parameters the units carry, all together.
    """

    def __init__(self, kind: str, owner: nn.Module, threshold_init: float, tau: float):
        sources, target, width = _unit_layout(kind, owner)
        num_units = sources[0].out_features // width
        unit_params = unit_parameters(sources, target, width)
        super().__init__(kind, num_units, width, num_units * unit_params, threshold_init, tau)
        self.unit_params = unit_params
        self.refer(_owner=owner)

    @property
    def sources(self) -> list[nn.Linear]:
        return _unit_layout(self.kind, self._owner)[0]

    def spread(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask.repeat_interleave(self.width)

    def kept_params(self, mask: torch.Tensor, soft: bool = True) -> torch.Tensor:
        return mask.sum() * self.unit_params

    @torch.no_grad()
    def remove_units(self, target: nn.Module, keep: torch.Tensor) -> None:
        """Slice the units not in ``keep`` (the hard mask, computed before any gate of the model
        was folded) out of their matrices."""
        keep = keep.nonzero().flatten()
        rows = (keep[:, None] * self.width + torch.arange(self.width, device=keep.device)).flatten()
        parametrize.remove_parametrizations(target, "weight", leave_parametrized=False)
        owner = self._owner
        for name in _source_names(self.kind):
            setattr(owner, name, _sliced(getattr(owner, name), rows=rows))
        target_name = _target_name(self.kind)
        setattr(owner, target_name, _sliced(getattr(owner, target_name), columns=rows))
        if self.kind == "heads":
            owner.num_heads = len(keep)


class ConvChannelGate(UnitGate):
    """The output channels of conv feature-encoder layer ``index`` (unit kind ``conv``): a channel's
    score is its filter's mean squared weight; the mask multiplies the matching input channels of
    layer ``index + 1``.

    Layer 0 of a ``feat_extract_norm: group`` model normalises each channel on its own, so a
    channel slices out exactly. Consecutive conv layers share weights (layer i+1's filters read
    layer i's channels), so each weight is counted once: a channel carries its bias and group-norm
    scale/shift (and, in layer 0, its filter), plus its input slice of every filter of layer i+1
    that the next gate keeps — a product of two masks, still differentiable.
    """

    def __init__(self, conv_layers: nn.ModuleList, index: int, threshold_init: float, tau: float):
        conv, following = conv_layers[index].conv, conv_layers[index + 1].conv
        norm = getattr(conv_layers[index], "layer_norm", None)
        self_params = ((conv.bias is not None) + 2 * (norm is not None)
                       + (raw_weight(conv)[0].numel() if index == 0 else 0))
        next_units, next_width = following.out_channels, following.kernel_size[0]
        super().__init__("conv", conv.out_channels, 1, conv.out_channels * (self_params + next_units * next_width),
                         threshold_init, tau)
        self.index, self.self_params, self.next_units, self.next_width = index, self_params, next_units, next_width
        self.refer(_owner=conv_layers, _next=None)  # _next: the gate of layer index + 1 (attach_neuron_gates)

    def chain(self, following: ConvChannelGate) -> None:
        """Count this layer's channels with the gate of the next layer (whose filters they feed)."""
        self.refer(_next=following)

    @property
    def sources(self) -> list[nn.Conv1d]:
        return [self._owner[self.index].conv]

    @property
    def unit_params(self) -> int:
        """Parameters per channel with the next layer's current hard mask (for calibration)."""
        kept_next = self.next_units if self._next is None else int(self._next.unit_hard_mask().sum())
        return self.self_params + kept_next * self.next_width

    def spread(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask[None, :, None]

    def kept_params(self, mask: torch.Tensor, soft: bool = True) -> torch.Tensor:
        if self._next is None:
            kept_next = self.next_units
        elif soft:
            kept_next = self._next.unit_soft_mask().sum()
        else:
            kept_next = self._next.unit_hard_mask().sum()
        return mask.sum() * (self.self_params + kept_next * self.next_width)

    @torch.no_grad()
    def remove_units(self, target: nn.Module, keep: torch.Tensor) -> None:
        keep = keep.nonzero().flatten()
        parametrize.remove_parametrizations(target, "weight", leave_parametrized=False)
        layer, following = self._owner[self.index], self._owner[self.index + 1]
        layer.conv = _sliced(layer.conv, rows=keep)
        following.conv = _sliced(following.conv, columns=keep)
        norm = getattr(layer, "layer_norm", None)
        if norm is not None:
            new = nn.GroupNorm(len(keep), len(keep), eps=norm.eps, affine=True,
                               device=norm.weight.device, dtype=norm.weight.dtype)
            new.weight.copy_(norm.weight[keep])
            new.bias.copy_(norm.bias[keep])
            layer.layer_norm = new


def raw_weight(module: nn.Module) -> torch.Tensor:
    """A module's weight without its gate (the plain weight if it has none)."""
    return unmasked_weight(module) if parametrize.is_parametrized(module, "weight") else module.weight


def _source_names(kind: str) -> tuple[str, ...]:
    return ("intermediate_dense",) if kind == "ffn" else ("q_proj", "k_proj", "v_proj")


def _target_name(kind: str) -> str:
    return "output_dense" if kind == "ffn" else "out_proj"


def _unit_layout(kind: str, owner: nn.Module) -> tuple[list[nn.Linear], nn.Linear, int]:
    """(source Linear layers, target Linear, rows per unit) of a feed-forward / attention module."""
    width = 1 if kind == "ffn" else owner.head_dim
    return [getattr(owner, name) for name in _source_names(kind)], getattr(owner, _target_name(kind)), width


def _sliced(layer: nn.Linear | nn.Conv1d, rows: torch.Tensor | None = None,
            columns: torch.Tensor | None = None) -> nn.Linear | nn.Conv1d:
    """A copy of ``layer`` with only the output ``rows`` (channels) and input ``columns`` (channels)
    given (None: all), same device, dtype and ``requires_grad``."""
    weight = layer.weight
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, columns] if columns is not None else weight
    if isinstance(layer, nn.Conv1d):
        new = nn.Conv1d(weight.shape[1], weight.shape[0], kernel_size=layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                        device=weight.device, dtype=weight.dtype)
    else:
        new = resized_linear(layer, in_features=weight.shape[1], out_features=weight.shape[0])
    new.weight.copy_(weight)
    if layer.bias is not None:
        new.bias.copy_(layer.bias[rows] if rows is not None else layer.bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def neuron_owners(model: nn.Module, units: list[str]) -> list[tuple[str, str, nn.Module]]:
    """``(name, kind, module)`` of every unit owner: the feed-forward (``ffn``) and attention
    (``heads``) modules of the transformer layers, then the conv feature encoder (``conv``).

    ``units == ["auto"]``: every kind this model supports (ffn always; heads unless the attention
    computes a per-head position bias from its input, as WavLM's does; conv when the feature
    encoder normalises each channel on its own); the kinds left out are logged. A kind listed
    explicitly that the model cannot prune is an error.

    Raises:
        ConfigError: a model without transformer layers, or a listed kind it cannot prune, naming
            ``gates.neuron_units`` and the fix.
    """
    auto = list(units) == ["auto"]
    found, problems, skipped = [], [], []
    for name, module in model.named_modules():
        if not LAYER_PATTERN.fullmatch(name):
            continue
        ff, attention = getattr(module, "feed_forward", None), getattr(module, "attention", None)
        if (auto or "ffn" in units) and ff is not None and all(
                isinstance(getattr(ff, n, None), nn.Linear) for n in ("intermediate_dense", "output_dense")):
            found.append((f"{name}.feed_forward", "ffn", ff))
        if (auto or "heads" in units) and attention is not None:
            reason = _heads_unsupported(attention)
            if reason is None:
                found.append((f"{name}.attention", "heads", attention))
            elif auto:
                skipped.append(f"heads ({reason})")
            else:
                problems.append(f"gates.neuron_units: heads: {type(attention).__name__} ({name}.attention) {reason}; "
                                "remove heads from the list (or use [auto])")
    if auto or "conv" in units:
        conv, reason = _conv_owner(model)
        if conv is not None:
            found.append(conv)
        elif auto:
            skipped.append(f"conv ({reason})")
        else:
            problems.append(f"gates.neuron_units: conv: {reason}; remove conv from the list (or use [auto])")
    if not any(kind != "conv" for _, kind, _ in found) and not problems:
        problems.append(f"gates.granularity: neuron needs transformer layers (encoder.layers.N) with feed_forward "
                        f"/ attention modules; {type(model).__name__} has none, use granularity: weight")
    if problems:
        raise ConfigError(problems, source="gate settings")
    for reason in dict.fromkeys(skipped):
        log.info("neuron gates: not gating %s", reason)
    return found


def _heads_unsupported(attention: nn.Module) -> str | None:
    """Why the heads of an attention module cannot be pruned here, or None if they can."""
    if not all(isinstance(getattr(attention, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return "has no q_proj/k_proj/v_proj/out_proj Linear layers"
    if hasattr(attention, "rel_attn_embed") or hasattr(attention, "gru_rel_pos_linear"):
        return "computes a per-head position bias from its input, so a head cannot be removed alone"
    return None


def _conv_owner(model: nn.Module) -> tuple[tuple[str, str, nn.Module] | None, str]:
    """``((name, "conv", conv_layers), "")`` for a conv feature encoder whose channels can be
    removed exactly, else ``(None, why not)``."""
    encoders = [(name, m) for name, m in model.named_modules()
                if name.endswith("feature_extractor") and isinstance(getattr(m, "conv_layers", None), nn.ModuleList)]
    if not encoders:
        return None, f"{type(model).__name__} has no conv feature encoder (feature_extractor.conv_layers)"
    name, encoder = encoders[0]
    for layer in list(encoder.conv_layers)[:-1]:
        norm = getattr(layer, "layer_norm", None)
        if norm is not None and not (isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels):
            return None, (f"{name} normalises across channels ({type(norm).__name__}, feat_extract_norm: layer), "
                          "so a channel cannot be removed exactly")
    return (f"{name}.conv_layers", "conv", encoder.conv_layers), ""


def attach_neuron_gates(model: nn.Module, units: list[str], threshold_init: float, tau: float,
                        noise: float = 0.0) -> dict[str, NeuronGate]:
    """Give every feed-forward / attention module of the encoder a :class:`NeuronGate`; returns
    the gates by the name of the module whose weight they parametrize. ``noise``: ``gates.unit_noise``."""
    gates = {}
    for name, kind, owner in neuron_owners(model, units):
        if kind == "conv":  # every layer but the last: its channels feed the feature projection's norm
            chain = []
            for index in range(len(owner) - 1):
                target = owner[index + 1].conv
                chain.append(ConvChannelGate(owner, index, threshold_init, tau).to(raw_weight(target).device))
                parametrize.register_parametrization(target, "weight", chain[-1], unsafe=True)
                gates[f"{name}.{index + 1}.conv"] = chain[-1]
            for gate, following in zip(chain, chain[1:]):
                gate.chain(following)
            continue
        target = getattr(owner, _target_name(kind))
        gate = NeuronGate(kind, owner, threshold_init, tau).to(target.weight.device)
        parametrize.register_parametrization(target, "weight", gate, unsafe=True)
        gates[f"{name}.{_target_name(kind)}"] = gate
    with torch.no_grad():  # each threshold starts just under its layer's lowest unit score
        for gate in gates.values():
            gate.noise = float(noise)
            scores = gate.relative_scores()
            if not scores.is_meta:  # (a model built on the meta device has no scores to start from)
                gate.threshold.fill_(max(threshold_init, (UNIT_THRESHOLD_START * float(scores.min())) ** 0.5))
    return gates
