"""Speech CTC models: loading (hub id, local path, tiny preset or shipped foundation), processors,
parameter accounting.

Any Hugging Face ``*ForCTC`` speech model loads through ``AutoModelForCTC``: a pre-trained SSL
checkpoint (``facebook/wav2vec2-base``, ``facebook/hubert-large-ll60k``; its CTC head is created
fresh for our character vocabulary), a fine-tuned CTC model, or a pinch_ray artifact's ``model/``.
Tiny presets (random weights, a few hundred thousand parameters) serve tests. A shipped foundation
(``synth-tiny``: a tiny preset trained on the synthetic corpus, in ``pinch_ray/foundations/``)
is what the demo compresses; its ``foundation.json`` records how it was built and a fingerprint
of the code it depends on (:func:`foundation_fingerprint`), and loading one that no longer
matches the code is refused with the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForCTC,
    HubertConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
    WavLMConfig,
)

from pinch_ray import storage
from pinch_ray.core import gates as gates_lib
from pinch_ray.core import pruned_modeling

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz, what every model here expects

# Character vocabulary, the HF wav2vec2 CTC convention: <pad> is also the CTC blank, "|" the word
# delimiter (a space in a transcript), then apostrophe and the upper-case letters.
CHAR_VOCAB: dict[str, int] = {
    tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", "'"] + [chr(c) for c in range(65, 91)])
}

# Tiny presets: a front end that is fast on a CPU (four convs, 50 Hz frames, group norm, ReLU)
# with a 3-layer, 144-wide transformer: ~0.86M parameters.
TINY_PRESETS = {"tiny": Wav2Vec2Config, "tiny-wav2vec2": Wav2Vec2Config,
                "tiny-hubert": HubertConfig, "tiny-wavlm": WavLMConfig}
TINY_CONFIG = dict(
    conv_dim=(48, 48, 48, 48),  # channels of each conv layer
    conv_kernel=(20, 8, 4, 4),  # samples/frames
    conv_stride=(10, 4, 4, 2),  # total stride 320 samples = 20 ms = 50 Hz frames
    feat_extract_norm="group",
    feat_extract_activation="relu",
    conv_bias=False,
    hidden_size=144,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=576,
    num_conv_pos_embeddings=32,  # positional conv kernel, frames
    num_conv_pos_embedding_groups=16,
    hidden_dropout=0.05,
    attention_dropout=0.05,
    activation_dropout=0.05,
    feat_proj_dropout=0.05,
    final_dropout=0.05,
    layerdrop=0.0,
    mask_time_prob=0.05,  # SpecAugment: fraction of frames starting a time mask
    mask_time_length=5,  # frames per time mask
    num_buckets=32,  # WavLM relative position buckets
    max_bucket_distance=200,
)


# Foundations shipped with the package: pinch_ray/foundations/<name>/ (a model directory plus
# FOUNDATION_FILE), named by model.init_from like a hub id.
FOUNDATIONS_DIR = Path(__file__).resolve().parents[1] / "foundations"
FOUNDATION_FILE = "foundation.json"
DEFAULT_FOUNDATION = "synth-tiny"  # what pipelines/foundation.yaml builds; other foundations are named by --name
FOUNDATION_PIPELINE = "foundation"  # the run name (and pipelines/<name>.yaml) that builds DEFAULT_FOUNDATION


def rebuild_command(run_name: str, foundation: str) -> str:
    """The command that rebuilds the foundation ``foundation`` from the pipeline whose run name is
    ``run_name`` (``pipelines/<run_name, - as _>.yaml``, output in ``runs/<run_name>``)."""
    name_flag = "" if foundation == DEFAULT_FOUNDATION else f" --name {foundation}"
    return (f"pinch-ray run pipelines/{run_name.replace('-', '_')}.yaml && "
            f"pinch-ray foundation ship runs/{run_name}{name_flag}")


REBUILD_FOUNDATION = rebuild_command(FOUNDATION_PIPELINE, DEFAULT_FOUNDATION)


class FoundationDrift(ValueError):
    """A shipped foundation was built by code that differs from this code where it matters."""


def foundation_names() -> list[str]:
    """The foundations shipped with this installation."""
    if not FOUNDATIONS_DIR.is_dir():
        return []
    return sorted(path.parent.name for path in FOUNDATIONS_DIR.glob(f"*/{FOUNDATION_FILE}"))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def foundation_fingerprint(preset: str, overrides: dict, corpus: dict) -> dict[str, str]:
    """What a foundation trained from ``preset`` (+ ``overrides``) on the synthetic corpus
    ``corpus`` (``{"synth_utterances": N, "synth_seed": S}``) depends on in this code: the preset's
    settings, the vocabulary, and the corpus plan (every utterance's sentence, split and speaker)."""
    from pinch_ray.data import synth  # the corpus generator (data does not import core: no cycle)

    plan = synth.plan_corpus(corpus["synth_utterances"], corpus["synth_seed"])
    return {"preset": _digest([preset, TINY_PRESETS[preset].__name__, TINY_CONFIG, overrides]),
            "vocabulary": _digest(CHAR_VOCAB),
            "corpus": _digest([synth.SAMPLE_RATE, [vars(s) for s in synth.SPEAKERS], [vars(u) for u in plan]])}


def _training_minutes(record: dict) -> str:
    seconds = record.get("results", {}).get("training_seconds")
    return f"about {seconds / 60:.0f} minutes where it was built" if seconds else "see foundation.json"


def foundation_record(init_from: str) -> dict | None:
    """The ``foundation.json`` of the shipped foundation ``init_from`` names, or None."""
    if "/" in init_from or init_from not in foundation_names():
        return None
    return json.loads((FOUNDATIONS_DIR / init_from / FOUNDATION_FILE).read_text())


def checkpoint_path(init_from: str) -> str:
    """Where ``init_from`` is read from: a shipped foundation's directory, else ``init_from``.

    Raises:
        FoundationDrift: the foundation no longer matches the code (its message names the command
            that rebuilds it).
    """
    record = foundation_record(init_from)
    if record is None:
        return init_from
    directory = FOUNDATIONS_DIR / init_from
    now = foundation_fingerprint(record["model"]["preset"], record["model"]["overrides"], record["corpus"])
    changed = [key for key, value in record["fingerprint"].items() if now.get(key) != value]
    if changed:
        raise FoundationDrift(
            f"model.init_from={init_from!r}: the shipped foundation was built with a different "
            f"{' and '.join(changed)} than this code has ({directory / FOUNDATION_FILE}); rebuild it with "
            f"'{record.get('rebuild', REBUILD_FOUNDATION)}' (its training: {_training_minutes(record)}), "
            "or name another model")
    return str(directory)


def portable_init_from(init_from: str) -> str:
    """``init_from`` as every process of a run must read it: a local checkpoint directory made
    absolute (Ray's workers do not run in the driver's working directory, so a relative path such as
    ``runs/foundation/foundation/model`` would be looked up elsewhere, or on the hub); presets,
    shipped foundations and anything that is not a local directory (hub ids) unchanged."""
    if init_from in TINY_PRESETS or foundation_record(init_from) is not None:
        return init_from
    return storage.absolute(init_from) if os.path.isdir(os.path.expanduser(init_from)) else init_from


def make_processor(vocab: dict[str, int] | None = None,
                   feature_extractor: Wav2Vec2FeatureExtractor | None = None) -> Wav2Vec2Processor:
    """A character CTC processor: feature extractor (16 kHz, normalised) + tokenizer over ``vocab``."""
    vocab = dict(vocab or CHAR_VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab))
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token="<pad>",
                                         bos_token="<s>", eos_token="</s>", word_delimiter_token="|")
    if feature_extractor is None:
        feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                     do_normalize=True, return_attention_mask=True)
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def tiny_config(preset: str = "tiny", vocab_size: int = len(CHAR_VOCAB), **overrides):
    """The HF config of a tiny preset (``tiny``/``tiny-wav2vec2``, ``tiny-hubert``, ``tiny-wavlm``)."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")
    settings = {**TINY_CONFIG, "vocab_size": vocab_size, "pad_token_id": CHAR_VOCAB["<pad>"],
                "ctc_loss_reduction": "mean", "ctc_zero_infinity": True, **overrides}
    return TINY_PRESETS[preset](**settings)


def load_model(init_from: str, seed: int = 0, trust_remote_code: bool = False,
               **config_overrides) -> tuple[PreTrainedModel, Wav2Vec2Processor]:
    """Load a CTC model and its processor from a preset name, a local path or a hub id.

    ``init_from``: ``tiny`` / ``tiny-hubert`` / ``tiny-wavlm`` (random weights from ``seed``), a
    directory, or a hub id such as ``facebook/wav2vec2-base``. A checkpoint without a tokenizer
    (a pre-trained SSL model) gets the character vocabulary :data:`CHAR_VOCAB` and a fresh CTC head
    (random from ``seed``); one with a tokenizer keeps its vocabulary. Weights load in float32,
    whatever dtype the checkpoint was saved in. ``config_overrides`` go to the model config
    (e.g. ``layerdrop=0.0``).

    Raises:
        ValueError: the checkpoint is not a model ``AutoModelForCTC`` can build, or its vocabulary
            has no ``<pad>`` / ``|`` tokens.
    """
    if init_from in TINY_PRESETS:
        torch.manual_seed(seed)
        processor = make_processor()
        model = AutoModelForCTC.from_config(tiny_config(init_from, **config_overrides))
        return model, processor

    init_from = checkpoint_path(init_from)
    config = _read_config(init_from, trust_remote_code)  # first: see _read_config
    processor = load_processor(init_from, trust_remote_code)
    vocab = processor.tokenizer.get_vocab()
    settings = {"vocab_size": len(vocab), "pad_token_id": processor.tokenizer.pad_token_id,
                "ctc_loss_reduction": "mean", "ctc_zero_infinity": True, **config_overrides}
    if getattr(config, "vocab_size", None) == len(vocab):
        settings.pop("vocab_size")
    # A neuron-pruned export (smaller layers, see pinch_ray.core.pruned_modeling): its loader class, here
    # without trust_remote_code (the same code as the copy in the directory).
    if getattr(config, pruned_modeling.PRUNED_KEY, None):
        loader, loader_kwargs = pruned_modeling.loader_class(config.model_type), {}
    else:
        loader, loader_kwargs = AutoModelForCTC, {"trust_remote_code": trust_remote_code}
    # The seed first: a checkpoint without a CTC head gets a fresh one, drawn from it here.
    torch.manual_seed(seed)
    try:
        # float32 master weights whatever the checkpoint's dtype (transformers would keep an fp16 or
        # bf16 checkpoint in half precision: AdamW on half weights, no loss scaling); bf16 compute
        # comes from autocast (TrainConfig.bf16_autocast)
        model = loader.from_pretrained(init_from, **loader_kwargs, **settings, dtype=torch.float32)
    except ValueError as err:
        raise ValueError(f"init_from={init_from!r}: AutoModelForCTC cannot build a CTC model from this "
                         f"checkpoint ({err}); point init_from at a wav2vec2/HuBERT/WavLM checkpoint") from err
    return model, processor


def freeze_unused_parameters(model: nn.Module) -> list[str]:
    """Stop training the parameters ``model``'s settings never use in a training forward; returns
    their names. Such a parameter gets no gradient, and DDP (``find_unused_parameters=False``, the
    fast default) then fails on the second step ("Expected to have finished reduction in the prior
    iteration"). The one known: ``masked_spec_embed`` (the vector SpecAugment writes into masked
    frames) with time masking off but channel masking on (HF creates it for either, uses it for
    time masks only), or with ``apply_spec_augment`` off.
    """
    config = getattr(model, "config", None)
    frozen = []
    time_masks = getattr(config, "apply_spec_augment", True) and getattr(config, "mask_time_prob", 0) > 0
    if config is not None and not time_masks:
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "masked_spec_embed" and parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(name)
    return frozen


def _read_config(init_from: str, trust_remote_code: bool):
    """The checkpoint's model config, read before anything else of it, so that a checkpoint that is
    not there fails with its own error (not after the processor has logged that it found no
    tokenizer).

    Raises:
        OSError: no such local directory and no model id this machine can reach (naming both).
    """
    try:
        return AutoConfig.from_pretrained(init_from, trust_remote_code=trust_remote_code)
    except OSError as err:
        if os.path.exists(os.path.expanduser(init_from)):
            raise
        raise OSError(f"{init_from!r} is no directory under {os.getcwd()} and no model on the Hugging Face Hub "
                      f"that this machine can reach ({load_error_reason(err)})") from err


def load_error_reason(error: BaseException) -> str:
    """The first line of a loading error's message (transformers' can run to many lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_skeleton(init_from: str, trust_remote_code: bool = False, **config_overrides) -> PreTrainedModel:
    """The CTC model :func:`load_model` builds from ``init_from``, on the ``meta`` device: shapes,
    no weights (reads only the config and processor files), to count parameters before a run.

    Raises:
        OSError / ValueError: ``init_from`` is not a preset or a readable checkpoint.
    """
    if init_from in TINY_PRESETS:
        config = tiny_config(init_from, **config_overrides)
        loader = AutoModelForCTC
    else:
        init_from = checkpoint_path(init_from)
        config = _read_config(init_from, trust_remote_code)
        tokenizer = load_processor(init_from, trust_remote_code).tokenizer
        for key, value in {"vocab_size": len(tokenizer.get_vocab()), **config_overrides}.items():
            setattr(config, key, value)
        loader = (pruned_modeling.loader_class(config.model_type) if getattr(config, pruned_modeling.PRUNED_KEY, None)
                  else AutoModelForCTC)
    with torch.device("meta"):
        if loader is AutoModelForCTC:
            return AutoModelForCTC.from_config(config, trust_remote_code=trust_remote_code)
        return loader(config)


def _checkpoint_tokenizer(init_from: str) -> Wav2Vec2CTCTokenizer | None:
    """The checkpoint's CTC tokenizer, or None (a pre-trained SSL checkpoint has none)."""
    try:
        tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(init_from)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer if tokenizer.get_vocab() else None


def has_trained_head(init_from: str) -> bool:
    """Whether :func:`load_model` keeps a trained CTC head for ``init_from``: a checkpoint with a
    tokenizer (a fine-tuned CTC model, a pinch_ray ``model/``). A preset is random and an SSL
    checkpoint gets a new head."""
    return init_from not in TINY_PRESETS and _checkpoint_tokenizer(checkpoint_path(init_from)) is not None


def load_processor(init_from: str, trust_remote_code: bool) -> Wav2Vec2Processor:
    """The checkpoint's own processor if it has a tokenizer, else the character vocabulary."""
    init_from = checkpoint_path(init_from)
    tokenizer = _checkpoint_tokenizer(init_from)
    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(init_from, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        feature_extractor = None
    if tokenizer is None:
        log.info("%s has no tokenizer: using the %d-character vocabulary", init_from, len(CHAR_VOCAB))
        return make_processor(feature_extractor=feature_extractor)
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<pad>", "|") if t not in vocab]
    if missing:
        raise ValueError(f"init_from={init_from!r}: its tokenizer lacks {missing}; pinch_ray needs a character "
                         "CTC vocabulary with <pad> (blank) and | (word delimiter)")
    return make_processor(vocab, feature_extractor)


def frame_lengths(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """Output frames [B] the model's conv feature encoder makes of each utterance's real samples
    (``attention_mask`` [B, T], 1 = real sample)."""
    return model._get_feat_extract_output_lengths(attention_mask.sum(-1))


# ----------------------------------------------------------------------------------------------
# Parameter accounting
# ----------------------------------------------------------------------------------------------


@dataclass
class ParameterCounts:
    """Counts of model parameters (gate thresholds excluded: they are not part of the model)."""

    total: int  # every parameter of the plain model
    gated: int  # entries of gated weight matrices
    nonzero: int  # total minus the entries the hard masks remove (or exact zeros, once folded)

    @property
    def reduction(self) -> float:
        """Fraction of all parameters removed: 1 - nonzero / total."""
        return 1.0 - self.nonzero / self.total


def total_parameters(model: nn.Module) -> int:
    """Every parameter of a plain (ungated) model, as the paper counts them: what
    :func:`count_parameters` calls ``total``, from shapes alone (works on the ``meta`` device).

    Raises:
        ValueError: the model carries gates or masks.
    """
    if gates_lib.gated_modules(model):
        raise ValueError("total_parameters: the model carries gates; count it before attaching them")
    removed = pruned_modeling.removed_parameters(model) if isinstance(model, PreTrainedModel) else 0
    return sum(p.numel() for p in model.parameters()) + removed


@torch.no_grad()
def count_parameters(model: nn.Module) -> ParameterCounts:
    """Total, gated and nonzero parameters, measured on the hard-masked (or folded) model.

    For a gated model ``nonzero`` counts what the hard masks keep; for a plain model it counts the
    entries of weight matrices (``dim >= 2``) that are not exactly zero, plus every vector parameter,
    so a folded model gives the same ``nonzero`` as before folding. A model whose neurons/heads were
    removed (:mod:`pinch_ray.core.pruned_modeling`) counts them in ``total`` (its size before pruning)
    and not in ``nonzero``.
    """
    gated = gates_lib.gated_modules(model)
    total = gated_numel = nonzero = 0
    skip = {id(p) for _, gate in gated.values() for p in gate.parameters()}  # thresholds: not the model's
    for module, gate in gated.values():
        own, gate_total, gate_gated, gate_nonzero = gate.parameter_counts(module)
        skip |= own
        total, gated_numel, nonzero = total + gate_total, gated_numel + gate_gated, nonzero + gate_nonzero
    for p in model.parameters():
        if id(p) in skip:
            continue
        total += p.numel()
        # Exact zeros count as removed only in weight matrices: zero biases are a normal init.
        nonzero += int(torch.count_nonzero(p)) if p.dim() >= 2 else p.numel()
    removed = pruned_modeling.removed_parameters(model) if isinstance(model, PreTrainedModel) else 0
    return ParameterCounts(total=total + removed, gated=gated_numel, nonzero=nonzero)
