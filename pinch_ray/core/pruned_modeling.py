"""Loader for neuron-pruned models: per-layer feed-forward widths and attention heads.

A model pruned at neuron granularity (``gates.granularity: neuron``) has, in each transformer layer,
its own number of feed-forward neurons and attention heads. The stock wav2vec2 / HuBERT / WavLM
configs have one ``intermediate_size`` and one ``num_attention_heads`` for every layer, and
transformers 5 no longer has ``prune_heads`` for these models, so a stock class cannot hold the
smaller matrices. This module is the small loader that can. It imports only torch and transformers:
the export copies it verbatim into the model directory as ``modeling_pinch_ray_pruned.py`` and
points ``config.json``'s ``auto_map`` at it, so stock transformers loads the model without pinch_ray::

    AutoModelForCTC.from_pretrained("runs/demo/sspg-neuron-0.5/model", trust_remote_code=True)

The config carries the per-layer sizes, in encoder-layer order, under :data:`PRUNED_KEY`::

    "pinch_ray_pruned": {"intermediate_size": [412, 380, 455], "num_attention_heads": [4, 3, 4]}

The classes are the stock ``*ForCTC`` classes whose ``__init__`` builds the smaller layers; weight
names are unchanged. (wav2vec2-style attention reshapes with ``-1`` heads, so fewer rows in
q/k/v/out_proj is all a head fewer takes.)
"""

from __future__ import annotations

from torch import nn
from transformers import HubertForCTC, Wav2Vec2ForCTC, WavLMForCTC

PRUNED_KEY = "pinch_ray_pruned"
MODULE_FILE = "modeling_pinch_ray_pruned.py"  # the name this file gets inside a model directory


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a ``*ForCTC`` speech model (wav2vec2, HuBERT, WavLM)."""
    return getattr(model, model.base_model_prefix).encoder.layers


def resized_linear(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A fresh ``nn.Linear`` like ``linear`` with other sizes (same bias, device and dtype)."""
    return nn.Linear(linear.in_features if in_features is None else in_features,
                     linear.out_features if out_features is None else out_features,
                     bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)


def unit_parameters(sources: list[nn.Linear], target: nn.Linear, width: int) -> int:
    """Parameters one unit carries: its ``width`` rows (and biases) of each source Linear, and its
    ``width`` input columns of the target (an FFN neuron: width 1; a head: width ``head_dim``)."""
    return sum(width * (m.in_features + (m.bias is not None)) for m in sources) + width * target.out_features


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Feed-forward neurons and attention heads of every layer, read from the modules' shapes."""
    layers = encoder_layers(model)
    return {"intermediate_size": [layer.feed_forward.intermediate_dense.out_features for layer in layers],
            "num_attention_heads": [layer.attention.q_proj.out_features // layer.attention.head_dim
                                    for layer in layers]}


def shrink(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Replace each layer's feed-forward and attention projections by (untrained) ones of the given
    per-layer sizes, in place; the weights are then loaded (``from_pretrained`` / ``load_state_dict``)."""
    layers = encoder_layers(model)
    widths, heads = shapes["intermediate_size"], shapes["num_attention_heads"]
    if len(widths) != len(layers) or len(heads) != len(layers):
        raise ValueError(f"{PRUNED_KEY}: {len(widths)} feed-forward and {len(heads)} attention sizes for a "
                         f"model of {len(layers)} layers")
    for layer, width, num_heads in zip(layers, widths, heads):
        ff, attention = layer.feed_forward, layer.attention
        if width != ff.intermediate_dense.out_features:
            ff.intermediate_dense = resized_linear(ff.intermediate_dense, out_features=width)
            ff.output_dense = resized_linear(ff.output_dense, in_features=width)
        if num_heads != attention.num_heads:
            rows = num_heads * attention.head_dim
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attention, name, resized_linear(getattr(attention, name), out_features=rows))
            attention.out_proj = resized_linear(attention.out_proj, in_features=rows)
            attention.num_heads = num_heads
    return model


PRUNED_CLASSES = {"wav2vec2": "PinchRayPrunedWav2Vec2ForCTC", "hubert": "PinchRayPrunedHubertForCTC",
                  "wavlm": "PinchRayPrunedWavLMForCTC"}  # model_type -> loader class (defined below)


def unit_reduction(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(module name, parameters of its units before pruning, parameters removed)`` of every
    layer's gated unit kinds: feed-forward neurons, attention heads, conv layers (the config keeps
    the original ``intermediate_size`` / ``num_attention_heads`` / ``original_conv_dim``). Empty for
    a model that was not neuron-pruned."""
    shapes = getattr(model.config, PRUNED_KEY, None)
    if not shapes:
        return []
    units = shapes.get("units", ["ffn", "heads", "conv"])
    prefix = f"{model.base_model_prefix}.encoder.layers"
    out = []
    for i, layer in enumerate(encoder_layers(model)):
        ff, attention = layer.feed_forward, layer.attention
        neuron = unit_parameters([ff.intermediate_dense], ff.output_dense, 1)
        kept = ff.intermediate_dense.out_features
        if "ffn" in units:
            out.append((f"{prefix}.{i}.feed_forward", model.config.intermediate_size * neuron,
                        (model.config.intermediate_size - kept) * neuron))
        head = unit_parameters([attention.q_proj, attention.k_proj, attention.v_proj], attention.out_proj,
                               attention.head_dim)
        kept = attention.q_proj.out_features // attention.head_dim
        if "heads" in units:
            out.append((f"{prefix}.{i}.attention", model.config.num_attention_heads * head,
                        (model.config.num_attention_heads - kept) * head))
    if "conv" not in units:
        return out
    # conv feature encoder: each layer's parameters before (from original_conv_dim) and now
    original = getattr(model.config, PRUNED_KEY).get("original_conv_dim") or list(model.config.conv_dim)
    conv_layers = _conv_layers(model)
    for i, layer in enumerate(conv_layers):
        conv, norm = layer.conv, getattr(layer, "layer_norm", None)
        channels_in = 1 if i == 0 else original[i - 1]
        before = original[i] * (channels_in * conv.kernel_size[0] + (conv.bias is not None))
        if norm is not None:  # group norm: a scale and a shift per channel (others are never pruned)
            before += 2 * original[i] if isinstance(norm, nn.GroupNorm) else sum(p.numel() for p in norm.parameters())
        now = sum(p.numel() for p in layer.parameters())
        out.append((f"{model.base_model_prefix}.feature_extractor.conv_layers.{i}", before, before - now))
    return out


def removed_parameters(model: nn.Module) -> int:
    """Parameters of the units pruned away (0 for a model that was not neuron-pruned)."""
    return sum(removed for _, _, removed in unit_reduction(model))


def mark_pruned(model: nn.Module, units: list[str]) -> None:
    """Record the model's per-layer sizes in its config and point ``auto_map`` at this loader.

    ``units``: the kinds of unit that were gated (``ffn``, ``heads``, ``conv``), recorded so the
    parameter accounting covers exactly what the gates did. Conv feature-encoder channels need no
    loader (``conv_dim`` is per layer in the stock config): ``conv_dim`` becomes the channels left
    and ``original_conv_dim`` keeps the count before."""
    config = model.config
    if config.model_type not in PRUNED_CLASSES:
        raise ValueError(f"neuron-pruned export supports {', '.join(PRUNED_CLASSES)} models, "
                         f"not {config.model_type!r}")
    previous = getattr(config, PRUNED_KEY, None) or {}
    channels = [layer.conv.out_channels for layer in _conv_layers(model)]
    setattr(config, PRUNED_KEY, {**layer_shapes(model), "units": sorted(set(previous.get("units", [])) | set(units)),
                                 "original_conv_dim": previous.get("original_conv_dim", list(config.conv_dim))})
    config.conv_dim = channels
    config.auto_map = {"AutoModelForCTC": f"{MODULE_FILE.removesuffix('.py')}.{PRUNED_CLASSES[config.model_type]}"}


def _conv_layers(model: nn.Module) -> nn.ModuleList:
    return getattr(model, model.base_model_prefix).feature_extractor.conv_layers


class PinchRayPrunedWav2Vec2ForCTC(Wav2Vec2ForCTC):
    def __init__(self, config):
        super().__init__(config)
        shrink(self, getattr(config, PRUNED_KEY))


class PinchRayPrunedHubertForCTC(HubertForCTC):
    def __init__(self, config):
        super().__init__(config)
        shrink(self, getattr(config, PRUNED_KEY))


class PinchRayPrunedWavLMForCTC(WavLMForCTC):
    def __init__(self, config):
        super().__init__(config)
        shrink(self, getattr(config, PRUNED_KEY))




def loader_class(model_type: str) -> type:
    """The loader class for a neuron-pruned model of ``model_type`` (wav2vec2, hubert, wavlm)."""
    if model_type not in PRUNED_CLASSES:
        raise ValueError(f"no neuron-pruned loader for model type {model_type!r}; "
                         f"supported: {', '.join(PRUNED_CLASSES)}")
    return globals()[PRUNED_CLASSES[model_type]]
