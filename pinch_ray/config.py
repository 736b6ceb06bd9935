"""Typed configuration: every default lives here, once, with its meaning and unit.

Each stage reads one section (a dataclass). Sections validate themselves with ``problems()``,
which returns *all* problems as ``"key: what is wrong; how to fix it"`` strings, and
``raise_if_problems`` turns them into one :class:`ConfigError`, so a user fixes everything in one go.

Later stages (pipeline YAML, overrides) build on these sections; nothing here reads files or argv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("dense", "ump", "sspg")
MAX_TARGET_SPARSITY = 0.99


class ConfigError(ValueError):
    """Invalid configuration. ``problems`` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


def raise_if_problems(problems: list[str], source: str = "config") -> None:
    if problems:
        raise ConfigError(problems, source)


# --------------------------------------------------------------------------------------------
# Gates (the compression method)
# --------------------------------------------------------------------------------------------

# Module-name patterns (regular expressions, matched against the whole dotted name) of the
# weight matrices gated by default: attention q/k/v/out and feed-forward in/out of every
# transformer layer, and the feature projection. They match wav2vec2, HuBERT and WavLM alike.
DEFAULT_GATE_PATTERNS = (
    r".*encoder\.layers\.\d+\.attention\.(q_proj|k_proj|v_proj|out_proj)",
    r".*encoder\.layers\.\d+\.feed_forward\.(intermediate_dense|output_dense)",
    r".*feature_projection\.projection",
)
# Optional groups, switched on with GateConfig.gate_feature_encoder / gate_pos_conv.
FEATURE_ENCODER_PATTERN = r".*feature_extractor\.conv_layers\.\d+\.conv"
POS_CONV_PATTERN = r".*encoder\.pos_conv_embed\.conv"


@dataclass
class GateConfig:
    """Self-pinching gates and the sparsity-aware objective (see ``pinch_ray.gates``)."""

    # Regular expressions over module names (full match); every matched nn.Linear / nn.Conv1d
    # weight gets one learnable threshold. Each pattern must match at least one module.
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_GATE_PATTERNS))
    gate_feature_encoder: bool = False  # also gate the conv feature encoder
    gate_pos_conv: bool = False  # also gate the positional convolution
    # Temperature of the soft mask, relative to the layer's mean squared weight (unitless):
    # tau_l = tau * mean(W_l^2). Annealed geometrically from tau_start to tau_end over training.
    tau_start: float = 0.05
    tau_end: float = 0.005
    # Initial threshold, in units of the layer's RMS weight: t_l = threshold_init * rms(W_l).
    threshold_init: float = 0.1
    # Sparsity objective: lambda_1 (s - s*) + penalty (s - s*)^2, lambda_1 trained by gradient
    # ascent (a Lagrange multiplier), penalty fixed. Learning rate of lambda_1 (per step, unitless):
    lagrangian_lr: float = 0.01
    penalty: float = 1000.0  # weight of the quadratic term (unitless)
    # Fraction of the training steps over which the sparsity target ramps (ease-out) from the
    # initial soft sparsity to target_sparsity.
    target_warmup_fraction: float = 0.5
    # After training, rescale all thresholds by one common factor so that the hard sparsity
    # equals the target, if it misses by more than calibration_tolerance (fraction, 0.005 =
    # 0.5 points). Both values are reported.
    calibrate: bool = True
    calibration_tolerance: float = 0.005

    def all_patterns(self) -> list[str]:
        extra = [FEATURE_ENCODER_PATTERN] * self.gate_feature_encoder + [POS_CONV_PATTERN] * self.gate_pos_conv
        return list(self.patterns) + extra

    def problems(self, prefix: str = "gates") -> list[str]:
        out = []
        if not self.tau_start > 0 or not self.tau_end > 0:
            out.append(f"{prefix}.tau_start/tau_end: must be > 0 (got {self.tau_start}, {self.tau_end})")
        elif self.tau_end > self.tau_start:
            out.append(f"{prefix}.tau_end: must be <= tau_start ({self.tau_end} > {self.tau_start}); "
                       "the temperature anneals towards a hard step")
        if not self.threshold_init > 0:
            out.append(f"{prefix}.threshold_init: must be > 0 (got {self.threshold_init}); "
                       "a zero threshold receives no gradient")
        if not 0 <= self.target_warmup_fraction < 1:
            out.append(f"{prefix}.target_warmup_fraction: must be in [0, 1) (got {self.target_warmup_fraction})")
        if not self.lagrangian_lr > 0:
            out.append(f"{prefix}.lagrangian_lr: must be > 0 (got {self.lagrangian_lr})")
        if not self.penalty >= 0:
            out.append(f"{prefix}.penalty: must be >= 0 (got {self.penalty})")
        if not 0 < self.calibration_tolerance < 0.1:
            out.append(f"{prefix}.calibration_tolerance: must be in (0, 0.1) (got {self.calibration_tolerance})")
        if not self.all_patterns():
            out.append(f"{prefix}.patterns: empty; list at least one module-name pattern to gate")
        return out


def target_sparsity_problems(method: str, target_sparsity: float, key: str = "target_sparsity") -> list[str]:
    """Problems with a (method, target) pair: unknown method, target outside [0, 0.99]."""
    out = []
    if method not in METHODS:
        out.append(f"method: unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(target_sparsity, (int, float)) or not 0.0 <= target_sparsity <= MAX_TARGET_SPARSITY:
        out.append(f"{key}: {target_sparsity!r} is outside [0, {MAX_TARGET_SPARSITY}]; "
                   "it is the fraction of gated weights to remove, e.g. 0.65")
    elif method == "dense" and target_sparsity != 0:
        out.append(f"{key}: method 'dense' prunes nothing; set {key}=0 or use method sspg/ump")
    return out


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The training step and its schedule (plain PyTorch; Ray Train wraps it)."""

    max_steps: int = 2000  # optimizer steps of the whole run
    batch_size: int = 16  # utterances per micro-batch per worker
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate of the model weights (AdamW)
    # Learning rate of the gate thresholds (units of layer RMS per step). None: 4 / max_steps, so the
    # thresholds can travel the ~1-1.5 RMS units a 50-75% target needs during the target ramp,
    # whatever the run length, and move in small steps near the end.
    threshold_lr: float | None = None
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases, norms, thresholds)
    adam_betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 150  # linear lr warm-up from 0, in optimizer steps
    decay_fraction: float = 0.3  # cosine decay to 0 over this final fraction of max_steps
    max_grad_norm: float = 1.0  # gradient clipping (L2 norm over all parameters)
    freeze_feature_encoder: bool = False  # keep the conv feature encoder fixed (wav2vec2 recipe)
    bf16_autocast: bool = True  # bf16 autocast when running on a CUDA GPU (ignored on CPU)
    seed: int = 0

    @property
    def effective_threshold_lr(self) -> float:
        return self.threshold_lr if self.threshold_lr is not None else 4.0 / self.max_steps

    def problems(self, prefix: str = "training") -> list[str]:
        out = []
        for key in ("max_steps", "batch_size", "grad_accum_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                out.append(f"{prefix}.{key}: must be a positive integer (got {value!r})")
        if not self.lr > 0:
            out.append(f"{prefix}.lr: must be > 0 (got {self.lr!r})")
        if self.threshold_lr is not None and not self.threshold_lr > 0:
            out.append(f"{prefix}.threshold_lr: must be > 0, or unset for 4 / max_steps (got {self.threshold_lr!r})")
        if self.warmup_steps < 0:
            out.append(f"{prefix}.warmup_steps: must be >= 0 (got {self.warmup_steps})")
        if not 0 <= self.decay_fraction <= 1:
            out.append(f"{prefix}.decay_fraction: must be in [0, 1] (got {self.decay_fraction})")
        if not self.max_grad_norm > 0:
            out.append(f"{prefix}.max_grad_norm: must be > 0 (got {self.max_grad_norm})")
        return out



# --------------------------------------------------------------------------------------------
# Corpus and data preparation (see ``pinch_ray.corpus`` and ``pinch_ray.data``)
# --------------------------------------------------------------------------------------------

CORPUS_LAYOUTS = ("auto", "librispeech", "hf_parquet")


@dataclass
class CorpusConfig:
    """Where the speech corpus lives and which splits the pipeline uses."""

    # Corpus root: a local directory or a pyarrow-filesystem URI (s3://, gs://, file://).
    # LibriSpeech layout: <root>/<split>/<speaker>/<chapter>/*.flac + *.trans.txt;
    # HF layout: <root>/<split>/**/*.parquet in the `librispeech_asr` schema.
    root: str = "data/synth_corpus"
    # "librispeech" (FLAC + trans.txt), "hf_parquet", or "auto" (decided per split from the files).
    layout: str = "auto"
    train_split: str = "train"  # split directory used for training (LibriSpeech: train-clean-100)
    # Split directories evaluated after training (LibriSpeech: dev-clean, test-clean, test-other).
    eval_splits: list[str] = field(default_factory=lambda: ["dev", "test"])
    # Synthetic corpus (espeak-ng) generated at `root` when it does not exist; 0 = never generate
    # (a missing root is then an error). Total utterances over all splits, split 80/10/10.
    synth_utterances: int = 0
    synth_seed: int = 0  # seed of the synthetic corpus (sentences, speakers)

    def splits(self) -> list[str]:
        return [self.train_split, *self.eval_splits]

    def problems(self, prefix: str = "corpus") -> list[str]:
        out = []
        if not isinstance(self.root, str) or not self.root:
            out.append(f"{prefix}.root: empty; set it to a corpus directory or an s3:// / gs:// URI")
        if self.layout not in CORPUS_LAYOUTS:
            out.append(f"{prefix}.layout: unknown layout {self.layout!r}; use one of {', '.join(CORPUS_LAYOUTS)}")
        if not self.train_split:
            out.append(f"{prefix}.train_split: empty; name the training split directory, e.g. train-clean-100")
        if len(set(self.splits())) != len(self.splits()):
            out.append(f"{prefix}.eval_splits: {self.eval_splits} repeats a split or the train split; "
                       "list each split once")
        if not isinstance(self.synth_utterances, int) or self.synth_utterances < 0:
            out.append(f"{prefix}.synth_utterances: must be an integer >= 0 (got {self.synth_utterances!r}); "
                       "0 disables the synthetic corpus")
        return out


@dataclass
class DataConfig:
    """The prepare stage (audio -> parquet shards) and the batches fed to training."""

    sample_rate: int = 16000  # Hz; audio at any other rate is resampled (torchaudio)
    min_duration_s: float = 0.5  # utterances shorter than this (seconds) are skipped (too_short)
    max_duration_s: float = 20.0  # utterances longer than this (seconds) are skipped (too_long)
    # Zero mean / unit variance per utterance (the wav2vec2 feature extractor's do_normalize=True).
    normalize: bool = True
    # Utterances per Ray Data map_batches call of the prepare stage (decode -> features). Larger
    # calls amortise Ray's per-batch overhead (32 was ~30% slower than 256 on 2 cores).
    prepare_batch_size: int = 256
    # Utterances per prepare task = per parquet shard file. A task holds its whole shard in
    # memory before writing (~200 MB at 256 LibriSpeech utterances of ~12 s).
    rows_per_shard: int = 256
    # Prepared shards are cached here under a key of corpus + settings (rerun = cache hit).
    cache_dir: str = ".cache/prepared"
    # Length bucketing of training batches: rows are sorted by length within a window of this
    # many batches, cut into batches, and the batch order is shuffled (seed + epoch).
    bucket_window_batches: int = 20

    def problems(self, prefix: str = "data") -> list[str]:
        out = []
        if not isinstance(self.sample_rate, int) or self.sample_rate < 8000:
            out.append(f"{prefix}.sample_rate: must be an integer >= 8000 Hz (got {self.sample_rate!r}); "
                       "wav2vec2-family models expect 16000")
        if not 0 <= self.min_duration_s < self.max_duration_s:
            out.append(f"{prefix}.min_duration_s/max_duration_s: need 0 <= min < max "
                       f"(got {self.min_duration_s}, {self.max_duration_s}) seconds")
        for key in ("prepare_batch_size", "rows_per_shard", "bucket_window_batches"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                out.append(f"{prefix}.{key}: must be a positive integer (got {value!r})")
        if not self.cache_dir:
            out.append(f"{prefix}.cache_dir: empty; set a directory for prepared shards, e.g. .cache/prepared")
        return out
