"""The typed configuration schema: every default lives here, once, with its meaning and unit.

Each stage reads one section (a dataclass). Sections validate themselves with ``problems()``,
which returns *all* problems as ``"key: what is wrong; how to fix it"`` strings, and
``raise_if_problems`` turns them into one :class:`ConfigError`, so a user fixes everything in one go.
The pipeline config (:class:`PipelineConfig`, at the end) composes the sections;
:mod:`pinch_ray.config.loading` reads it from YAML plus ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field

from pinch_ray.config import typed
from pinch_ray.storage import local_path, scheme_problem
from pinch_ray.storage import join as storage_join

# dense: no pruning; ump: uniform magnitude pruning (weights) of the trial's starting model, then
# fine-tuning with the mask fixed; two-stage: the same, starting from the finished dense trial (the
# paper's two-stage baseline: its time includes the dense run's); sspg: self-pinching gates at
# gates.granularity; sspg-neuron: sspg with granularity neuron, so one sweep can hold both.
# The strong peers of sspg, one pass each (pinch_ray.core.peers): gmp, gradual magnitude pruning
# (cubic schedule, Zhu & Gupta 2017); movement, movement pruning with learned scores (Sanh et al.
# 2020); parp, prune-adjust-re-prune (Lai et al. 2021).
DENSE = "dense"  # the method that prunes nothing, and the name of its trial: the dense reference
METHODS = (DENSE, "ump", "two-stage", "sspg", "sspg-neuron", "gmp", "movement", "parp")
SSPG_METHODS = ("sspg", "sspg-neuron")
MAGNITUDE_METHODS = ("ump", "two-stage")  # fixed masks from |W|, uniform per gated matrix
RANKED_METHODS = ("gmp", "movement", "parp")  # masks re-ranked while training (GateConfig.mask_ranking)
MASK_RANKINGS = ("global", "layer")  # GateConfig.mask_ranking
GRANULARITIES = ("weight", "neuron")
THRESHOLD_UPDATES = ("adam", "shared")  # GateConfig.threshold_update
THRESHOLD_SCHEDULES = ("lr", "constant")  # GateConfig.threshold_schedule
NEURON_UNITS = ("ffn", "heads", "conv")
MAX_TARGET_SPARSITY = 0.99
# What a target sparsity is a fraction of. params: every parameter of the model (the paper's
# figures: "-65% parameters", 4.26x = total / remaining); gated: the entries the gates (or ump's
# masks) act on. The gated target of a params target is target x total / gated (exact).
TARGET_BASES = ("params", "gated")


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
# The conv layers, gated by sspg besides the patterns (GateConfig.gate_feature_encoder / gate_pos_conv).
FEATURE_ENCODER_PATTERN = r".*feature_extractor\.conv_layers\.\d+\.conv"
POS_CONV_PATTERN = r".*encoder\.pos_conv_embed\.conv"


@dataclass
class GateConfig:
    """Self-pinching gates and the sparsity-aware objective (see ``pinch_ray.core.gates``)."""

    # Regular expressions over module names (full match); every matched nn.Linear / nn.Conv1d
    # weight gets one learnable threshold. Each pattern must match at least one module.
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_GATE_PATTERNS))
    # sspg also gates the conv feature encoder's layers (gate_pos_conv: the positional convolution;
    # together 5-10% of a model's parameters), so a target of all parameters is spread over ~all of
    # them and the learned allocation decides what the convs give (synth-small at -65%, three seeds:
    # +0.30 point of test WER over dense against +0.58 with the patterns alone; docs/lab-notebook.md).
    # ump and two-stage prune the patterns only: a uniform cut in the conv layers cost ump 3.5 points
    # on the demo. To have them prune a conv layer too, add its pattern (FEATURE_ENCODER_PATTERN,
    # POS_CONV_PATTERN) to patterns.
    gate_feature_encoder: bool = True
    gate_pos_conv: bool = True  # sspg also gates the positional convolution (as gate_feature_encoder its convs)
    # What one sspg mask entry removes. weight: single weights of the matrices the patterns
    # select (the paper). neuron: whole units of the kinds neuron_units lists (by default every kind
    # the model supports: feed-forward neurons, attention heads, conv feature encoder channels;
    # patterns unused), so the exported matrices are smaller and faster; see pinch_ray.core.neurons.
    # The method sspg-neuron always uses neuron; ump always prunes weights.
    granularity: str = "weight"
    # Units gated at neuron granularity: ffn (feed-forward neurons), heads (attention heads; not
    # WavLM, whose position bias is per head), conv (channels of the conv feature encoder, all
    # layers but the last; feat_extract_norm group models such as wav2vec2-base / hubert-base).
    # [auto]: every kind the model supports (the others are logged). The conv encoder is about a
    # third of base-size CPU inference time, so conv is what makes a pruned model much faster.
    neuron_units: list[str] = field(default_factory=lambda: ["auto"])
    # Neuron granularity: scale of the logistic noise added to every unit's relative score in the
    # soft mask while training (0: none). Each step then samples near-binary unit masks around the
    # threshold (a unit within a few times this distance of it is sometimes dropped), so the loss
    # tells whether the model needs a unit before the threshold reaches it, as DPHuBERT's
    # hard-concrete gates do; without noise only the units inside the cold mask's narrow sigmoid
    # band get a gradient. Relative scores of a trained layer's units spread over ~0.5-1.6.
    # Measured at 0.1 on the synthetic benchmark (one seed): 0.8-1.3 points of dev WER worse than none
    # (docs/lab-notebook.md).
    unit_noise: float = 0.0
    # Temperature of the soft mask, relative to the layer's mean squared weight (unitless):
    # tau_l = tau * mean(W_l^2). Annealed geometrically from tau_start to tau_end over training.
    tau_start: float = 0.05
    tau_end: float = 0.005  # the temperature at the end of training (see tau_start)
    # Initial threshold, in units of the layer's RMS weight: t_l = threshold_init * rms(W_l).
    threshold_init: float = 0.1
    # How the thresholds learn. adam: Adam per threshold, so every threshold moves ~its learning rate
    # a step whatever its gradient (all layers at one speed, whatever pruning costs each). shared:
    # Adam with ONE second moment for all thresholds (the mean square of their gradients), so each
    # moves in proportion to its own gradient: what pruning costs the layer against the parameters
    # it frees, the signal a learned per-layer allocation needs.
    threshold_update: str = "adam"
    # One relative threshold shared by every gated matrix instead of one each: the control that
    # shows what the learned per-layer allocation is worth (every layer then prunes at the same
    # fraction of its own RMS weight; their sparsities differ only by their weight distributions).
    shared_threshold: bool = False
    # sspg (weight granularity; sspg-neuron's unit gates ignore it): the weights' own gradient passes
    # the soft mask straight through (dL/dW instead of dL/dW * M), so a pruned weight keeps receiving
    # the loss gradient and grows back over its threshold when the loss wants it (pruning with feedback,
    # Lin et al. 2020: "Dynamic Model Pruning with Feedback"); off, as in the paper, a weight pinched
    # off gets no gradient and comes back only if its threshold or layer scale moves. The thresholds and
    # the sparsity term see the same gradients either way. Over three seeds from synth-small: a tie with
    # off at 0.65 and at 0.765 of all parameters (docs/lab-notebook.md).
    regrow: bool = False
    # Sparsity objective: lambda_1 (s - s*) + penalty (s - s*)^2 over the gated soft sparsity s,
    # lambda_1 a Lagrange multiplier trained by plain gradient ascent once the target ramp is over
    # (while the target moves, integrating the lag would wind up and overshoot), penalty fixed.
    # Integral gain of lambda_1 per run: each step lambda_1 += lagrangian_gain / max_steps * (s - s*),
    # so a gap held for the whole run moves lambda_1 by lagrangian_gain x gap, whatever its length.
    lagrangian_gain: float = 10000.0
    penalty: float = 1000.0  # weight of the quadratic term (unitless)
    # Fraction of the training steps over which the sparsity target ramps (ease-out) from the
    # initial soft sparsity to target_sparsity.
    target_warmup_fraction: float = 0.5
    # After training, rescale all thresholds by one common factor so that the hard sparsity
    # equals the target, if it misses by more than calibration_tolerance (fraction, 0.005 =
    # 0.5 points). Both values are reported.
    calibrate: bool = True
    calibration_tolerance: float = 0.005  # see calibrate (fraction of the gated weights)
    # Gradient clipping of the thresholds (L2 norm over all of them; 0: none). The weights are
    # clipped alone (training.max_grad_norm): clipped together, the thresholds' gradients, which carry
    # the sparsity term, took most of the norm early in the ramp and set the weights' clip factor, so
    # the weights' optimizer saw their gradients rescaled by the state of the gates (AdamW then took
    # steps up to ~1.4x larger once the factor rose; docs/lab-notebook.md).
    threshold_max_grad_norm: float = 0.0
    # The thresholds' learning-rate schedule. lr: the weights' (warm-up, hold, cosine decay); constant:
    # their full rate from the first step to the last, so they move as fast where the target ramps
    # fastest (the start) and where lambda_1 closes the last gap (the end).
    threshold_schedule: str = "lr"
    # sspg (weight granularity): scale each gated weight's optimizer update by its soft mask, so a
    # weight under its threshold moves less (AdamW's normalisation otherwise gives the masked gradient
    # g * M a full-sized step and the pinching never reaches the update). Better on dev over three
    # seeds at 65% of all parameters, level at 76.5% (docs/results.md); false: the optimizer's update.
    masked_update: bool = True
    # gmp, movement, parp: how the masks are ranked. global: one ranking over every gated matrix (the
    # layers' sparsities differ); layer: each matrix at the target fraction (as ump).
    mask_ranking: str = "global"
    # gmp, movement, parp: optimizer steps between mask updates (gmp and movement follow a cubic
    # schedule from 0 to the target over target_warmup_fraction of training; parp re-prunes to the
    # target). The last update is at the end of the ramp (gmp) or of training (movement, parp).
    mask_update_every: int = 10

    # Settings one family of methods alone reads: the sspg methods' (thresholds, temperature,
    # Lagrangian, calibration, the masked update) and the ranked peers' (gmp, movement, parp). The
    # layer set and granularity are what for_method overrides for the magnitude and ranked methods.
    SSPG_ONLY: typing.ClassVar[tuple[str, ...]] = (
        "neuron_units", "unit_noise", "tau_start", "tau_end", "threshold_init", "threshold_update", "shared_threshold",
        "regrow", "lagrangian_gain", "penalty", "calibrate", "calibration_tolerance", "threshold_max_grad_norm",
        "threshold_schedule", "masked_update")
    RANKED_ONLY: typing.ClassVar[tuple[str, ...]] = ("mask_ranking", "mask_update_every")
    LAYER_SET: typing.ClassVar[tuple[str, ...]] = ("granularity", "gate_feature_encoder", "gate_pos_conv")

    @classmethod
    def unread_by(cls, method: str) -> tuple[str, ...]:
        """The settings a trial of ``method`` does not read: it trains the same whatever they say."""
        return ((() if method in SSPG_METHODS else cls.SSPG_ONLY)
                + (() if method in RANKED_METHODS else cls.RANKED_ONLY)
                + (cls.LAYER_SET if method in MAGNITUDE_METHODS + RANKED_METHODS else ()))

    def for_method(self, method: str) -> "GateConfig":
        """These settings as a trial of ``method`` uses them: sspg-neuron at granularity neuron; ump,
        two-stage and the peers (gmp, movement, parp) at weight granularity over the patterns alone
        (no conv layers: one layer set for the magnitude-based methods)."""
        if method == "sspg-neuron":
            return dataclasses.replace(self, granularity="neuron")
        if method in MAGNITUDE_METHODS + RANKED_METHODS:
            return dataclasses.replace(self, granularity="weight", gate_feature_encoder=False, gate_pos_conv=False)
        return self

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
        if not self.lagrangian_gain > 0:
            out.append(f"{prefix}.lagrangian_gain: must be > 0 (got {self.lagrangian_gain}); it is lambda_1's "
                       "change per unit of sparsity gap over a whole run")
        if not self.penalty >= 0:
            out.append(f"{prefix}.penalty: must be >= 0 (got {self.penalty})")
        if not 0 < self.calibration_tolerance < 0.1:
            out.append(f"{prefix}.calibration_tolerance: must be in (0, 0.1) (got {self.calibration_tolerance})")
        if not self.all_patterns():
            out.append(f"{prefix}.patterns: empty; list at least one module-name pattern to gate")
        if self.threshold_update not in THRESHOLD_UPDATES:
            out.append(f"{prefix}.threshold_update: {self.threshold_update!r}; use {' or '.join(THRESHOLD_UPDATES)}")
        if self.granularity not in GRANULARITIES:
            out.append(f"{prefix}.granularity: {self.granularity!r}; use {' or '.join(GRANULARITIES)}")
        if not self.unit_noise >= 0:
            out.append(f"{prefix}.unit_noise: must be >= 0 (got {self.unit_noise}); 0 turns the noise off")
        if not self.threshold_max_grad_norm >= 0:
            out.append(f"{prefix}.threshold_max_grad_norm: must be >= 0 (0: the thresholds are not clipped), "
                       f"got {self.threshold_max_grad_norm!r}")
        if self.threshold_schedule not in THRESHOLD_SCHEDULES:
            out.append(f"{prefix}.threshold_schedule: {self.threshold_schedule!r}; use "
                       f"{' or '.join(THRESHOLD_SCHEDULES)}")
        if self.mask_ranking not in MASK_RANKINGS:
            out.append(f"{prefix}.mask_ranking: {self.mask_ranking!r}; use {' or '.join(MASK_RANKINGS)}")
        if not isinstance(self.mask_update_every, int) or self.mask_update_every < 1:
            out.append(f"{prefix}.mask_update_every: must be a positive integer (got {self.mask_update_every!r}); "
                       "it is the optimizer steps between mask updates")
        bad_units = [unit for unit in self.neuron_units if unit not in NEURON_UNITS]
        if (self.neuron_units != ["auto"] and (bad_units or not self.neuron_units
                                               or len(set(self.neuron_units)) != len(self.neuron_units))):
            out.append(f"{prefix}.neuron_units: {self.neuron_units!r}; list ffn, heads and/or conv, each once, "
                       "or [auto]")
        return out


def target_sparsity_problems(method: str, target_sparsity: float, key: str = "target_sparsity",
                             target_basis: str = "params") -> list[str]:
    """Problems with a (method, target, basis): unknown method or basis, target outside [0, 0.99].
    (Whether the gated share of a model can reach a params target is checked on the model:
    ``pinch_ray.core.compressor.gated_target``.)"""
    out = []
    if method not in METHODS:
        out.append(f"method: unknown method {method!r}; use one of {', '.join(METHODS)}")
    if target_basis not in TARGET_BASES:
        out.append(f"target_basis: {target_basis!r}; use params (fraction of all parameters) or gated "
                   "(fraction of the gated weights)")
    if not isinstance(target_sparsity, (int, float)) or not 0.0 <= target_sparsity <= MAX_TARGET_SPARSITY:
        what = "all model parameters" if target_basis == "params" else "the gated weights"
        out.append(f"{key}: {target_sparsity!r} is outside [0, {MAX_TARGET_SPARSITY}]; "
                   f"it is the fraction of {what} to remove, e.g. 0.65")
    elif method == DENSE and target_sparsity != 0:
        out.append(f"{key}: method 'dense' prunes nothing; set {key}=0 or use method sspg/ump")
    return out


# --------------------------------------------------------------------------------------------
# Resources (Ray Train / Tune)
# --------------------------------------------------------------------------------------------


@dataclass
class ResourcesConfig:
    """Where training runs: workers per trial and what each gets.

    On an autoscaling cluster, ``cluster_max`` says what the cluster can grow to, so the resource
    check of a training run and the sweep's trial concurrency count the nodes the autoscaler will
    add rather than only those up at the start (:meth:`capacity`).
    """

    num_workers: int = 1  # Ray Train workers (DDP ranks) per training run
    use_gpu: bool = False  # one (or gpus_per_worker) GPU per worker; nccl instead of gloo
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker (may be fractional)
    gpus_per_worker: float = 1.0  # may be fractional, so small trials share a GPU (with use_gpu)
    max_failures: int = 2  # worker crashes a run survives (restarts from the last checkpoint)
    # What an autoscaling cluster can grow to, in Ray's resource names: {CPU: 200, GPU: 16} (head +
    # max workers x each node's resources; e.g. resources.cluster_max.GPU=16). Sizes the resource check
    # and sweep concurrency where larger than what is up; {} or 0: only what is up.
    cluster_max: dict[str, float] = field(default_factory=dict)

    CLUSTER_RESOURCES = ("CPU", "GPU")  # the keys cluster_max may set

    def capacity(self, cluster: dict[str, float]) -> dict[str, float]:
        """``{"CPU": ..., "GPU": ...}`` a run may count on: per resource, the larger of ``cluster``
        (what is up: Ray's ``cluster_resources()``) and ``cluster_max`` (what it can grow to)."""
        return {key: max(cluster.get(key, 0), self.cluster_max.get(key, 0)) for key in self.CLUSTER_RESOURCES}

    def problems(self, prefix: str = "resources") -> list[str]:
        out = []
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            out.append(f"{prefix}.num_workers: must be a positive integer (got {self.num_workers!r})")
        if not self.cpus_per_worker > 0:
            out.append(f"{prefix}.cpus_per_worker: must be > 0 (got {self.cpus_per_worker!r})")
        if self.use_gpu and not 0 < self.gpus_per_worker:
            out.append(f"{prefix}.gpus_per_worker: must be > 0 with use_gpu (got {self.gpus_per_worker!r})")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            out.append(f"{prefix}.max_failures: must be an integer >= -1 (-1: unlimited), got {self.max_failures!r}")
        for key, amount in self.cluster_max.items():
            if key not in self.CLUSTER_RESOURCES:
                out.append(f"{prefix}.cluster_max.{key}: unknown resource; set CPU and/or GPU (Ray's names, "
                           f"e.g. {prefix}.cluster_max.GPU=16)")
            elif not amount >= 0:
                out.append(f"{prefix}.cluster_max.{key}: must be >= 0 (0: what is up), got {amount!r}")
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
    adam_betas: tuple[float, float] = (0.9, 0.98)  # AdamW (beta1, beta2) of the model weights
    warmup_steps: int = 150  # linear lr warm-up from 0, in optimizer steps
    decay_fraction: float = 0.3  # cosine decay to 0 over this final fraction of max_steps
    max_grad_norm: float = 1.0  # gradient clipping (L2 norm over all parameters)
    freeze_feature_encoder: bool = False  # keep the conv feature encoder fixed (wav2vec2 recipe)
    report_every: int = 10  # optimizer steps between metric reports (ray.train.report, TensorBoard)
    checkpoint_every: int = 200  # optimizer steps between checkpoints (and one at the end)
    # Optimizer steps between dev-set WER/CER evaluations during training (and one at the end);
    # 0: none (the pipeline's finalize stage evaluates every trial anyway).
    eval_every: int = 500
    eval_batch_size: int = 16  # utterances per dev-evaluation batch
    bf16_autocast: bool = True  # bf16 autocast when running on a CUDA GPU (ignored on CPU)
    # Intra-op CPU threads of each training worker (torch.set_num_threads); 0: Ray's default, the
    # worker's CPUs rounded up. More threads than cores, counting every run at once, is much slower.
    torch_threads: int = 0
    seed: int = 0  # a tiny preset's weights or a fresh CTC head, the batch order, dropout and SpecAugment's masks
    # Distillation from the model each compression trial starts from (frozen, on the same worker;
    # the dense reference trains on CTC alone). Weights of the two terms, 0: off.
    # distill_logits: KL of the CTC output distributions, used only where that model's CTC head was
    # trained (not on a pre-trained SSL checkpoint, whose head is new).
    distill_logits: float = 0.0
    # distill_hidden: L1 - log sigmoid(cosine) between hidden states on distill_layers.
    distill_hidden: float = 0.0
    # Indices into the model's hidden_states (0: the projected features, -1: the last layer); []: the last.
    distill_layers: list[int] = field(default_factory=list)
    distill_temperature: float = 1.0  # softens both distributions of distill_logits

    @property
    def effective_threshold_lr(self) -> float:
        return self.threshold_lr if self.threshold_lr is not None else 4.0 / self.max_steps

    def problems(self, prefix: str = "training") -> list[str]:
        out = []
        for key in ("max_steps", "batch_size", "grad_accum_steps", "report_every", "checkpoint_every",
                    "eval_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                out.append(f"{prefix}.{key}: must be a positive integer (got {value!r})")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            out.append(f"{prefix}.eval_every: must be an integer >= 0 (0: no evaluation during training), "
                       f"got {self.eval_every!r}")
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
        if not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            out.append(f"{prefix}.torch_threads: must be an integer >= 0 (0: Ray's default), got {self.torch_threads!r}")
        for key in ("distill_logits", "distill_hidden"):
            if not getattr(self, key) >= 0:
                out.append(f"{prefix}.{key}: must be >= 0 (0: off), got {getattr(self, key)!r}")
        if not self.distill_temperature > 0:
            out.append(f"{prefix}.distill_temperature: must be > 0 (got {self.distill_temperature!r})")
        if self.distill_layers and not self.distill_hidden:
            out.append(f"{prefix}.distill_layers: set, but distill_hidden is 0; give distill_hidden a weight "
                       "(e.g. 1.0) or remove distill_layers")
        return out



# --------------------------------------------------------------------------------------------
# Corpus and data preparation (see ``pinch_ray.data``)
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
    # Utterances per parquet row group written by a prepare task: a task holds one row group of
    # features in memory at a time (~200 MB at 256 LibriSpeech utterances of ~12 s).
    prepare_batch_size: int = 256
    # At most this many utterances per parquet shard file (a task writes up to 4 shards).
    rows_per_shard: int = 256
    # Prepared shards are cached here under a key of corpus + settings (rerun = cache hit): a
    # directory, or an object-store URI (s3://bucket/prepared, file:///...) every node reaches.
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


# --------------------------------------------------------------------------------------------
# Evaluation and finalize (see ``pinch_ray.core.scoring`` and ``pinch_ray.pipeline.report``)
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Batch inference over the evaluation splits when a trial is finalized."""

    batch_size: int = 16  # utterances per inference batch (padded to the longest in the batch)
    # Ray Data actors transcribing in parallel, each holding one model copy; 0: in the driver process
    # (no actor startup, ~10 s per split saved: best for small evaluation sets on one machine).
    num_actors: int = 1
    # GPUs per actor; None: 1 when the Ray cluster has GPUs or can grow to them
    # (resources.cluster_max.GPU), else 0 (CPU inference).
    gpus_per_actor: float | None = None

    def problems(self, prefix: str = "eval") -> list[str]:
        out = []
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            out.append(f"{prefix}.batch_size: must be a positive integer (got {self.batch_size!r})")
        if not isinstance(self.num_actors, int) or self.num_actors < 0:
            out.append(f"{prefix}.num_actors: must be an integer >= 0 (0: in the driver), got {self.num_actors!r}")
        if self.gpus_per_actor is not None and not self.gpus_per_actor >= 0:
            out.append(f"{prefix}.gpus_per_actor: must be >= 0, or unset for automatic (got {self.gpus_per_actor!r})")
        return out


# --------------------------------------------------------------------------------------------
# The pipeline: every section, loaded from a YAML file plus key=value overrides
# --------------------------------------------------------------------------------------------

COMPRESSION_METHODS = tuple(method for method in METHODS if method != DENSE)  # what a sweep trial runs
RUNS_DIR = "runs"  # <output_dir>/runs/<trial>: the Ray Train runs (checkpoints) when storage_path is unset
FOUNDATION_TRIAL = "foundation"  # the dense baseline's name when compression trials start from it
# Splits the synthetic corpus generator writes (``pinch_ray.data.synth.DEFAULT_SPLITS``; not
# imported, because that module pulls in the audio stack).
SYNTH_SPLITS = ("train", "dev", "test")
# Utterances of the synthetic corpus the default pipeline generates when corpus.root is missing
# (about 45 s on 2 cores; the `pinch-ray corpus synth` default too).
DEFAULT_SYNTH_UTTERANCES = 6000
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a directory name and a Ray run name


@dataclass
class ModelConfig:
    """The model to fine-tune and compress (see ``pinch_ray.core.models.load_model``)."""

    # A tiny preset (tiny, tiny-hubert, tiny-wavlm: random weights, for tests and
    # pipelines/from_scratch.yaml; tiny is the default, so a pipeline names its model), a shipped
    # foundation (synth-tiny: the demo's; pinch-ray foundation list), a checkpoint directory or a hub
    # id such as facebook/wav2vec2-base. A name that is a local directory (from_pretrained looks there first)
    # is read from this working directory: the run hands Ray's workers its absolute path.
    init_from: str = "tiny"
    trust_remote_code: bool = False  # let transformers run code shipped with the checkpoint
    # Hugging Face config overrides, e.g. {layerdrop: 0.0, mask_time_prob: 0.05}.
    overrides: dict = field(default_factory=dict)

    def problems(self, prefix: str = "model") -> list[str]:
        out = []
        if not self.init_from:
            out.append(f"{prefix}.init_from: empty; name a preset (tiny), a checkpoint directory or a hub id")
        bad_keys = [key for key in self.overrides if not (isinstance(key, str) and key.isidentifier())]
        if bad_keys:
            out.append(f"{prefix}.overrides: {bad_keys} are not config attribute names; write e.g. layerdrop: 0.0")
        return out


@dataclass
class SweepConfig:
    """The compression trials (Ray Tune): every method at each of its target sparsities."""

    # sspg / sspg-neuron / ump / two-stage / gmp / movement / parp (dense is the baseline: dense_baseline)
    methods: list[str] = field(default_factory=lambda: ["sspg", "ump"])
    # Fractions to remove (of all parameters, see target_basis); one trial per (method, target).
    target_sparsities: list[float] = field(default_factory=lambda: [0.5, 0.65, 0.75])
    # What the targets are fractions of: params (every parameter of the model, as the paper counts:
    # 0.65 = "65% fewer parameters", 1 - 1/4.26 = 0.765 = "4.26x") or gated (the entries of the
    # method's gated matrices only; sspg's include the conv layers, ump's do not, so at gated one
    # target is not one budget). A params target the gated share cannot reach is refused before the run.
    target_basis: str = "params"
    # Per-method target lists replacing target_sparsities for that method: {ump: [0.65]} runs ump
    # at 0.65 only, while sspg runs every target_sparsities entry.
    method_targets: dict[str, list[float]] = field(default_factory=dict)
    # Repeated trials: one per seed and (method, target), named <trial>-seed<k> (training.seed = k:
    # batch order, fresh heads), and per seed a dense reference dense-seed<k> trained in the sweep
    # (in place of the single "dense"); summary.md then gives
    # mean +- std per (method, target) and a significance test pooled over the seeds, each seed
    # against its own reference. []: one trial each at training.seed, no seed in its name.
    seeds: list[int] = field(default_factory=list)
    max_concurrent_trials: int = 0  # trials running at once; 0: as many as the cluster's resources allow
    # The output_dir of an earlier run whose finished dense references (dense, dense-seed<k>) this
    # sweep reuses instead of training them again, e.g. an ablation beside pipelines/peers.yaml's run
    # (sweep.dense_from=runs/peers). Each must have been trained with this run's settings (the same
    # start, corpus, training); one that is missing there is trained here. "": train them here.
    dense_from: str = ""
    # Compression trials start from the dense baseline's fine-tuned weights (trial "foundation";
    # needs dense_baseline) instead of model.init_from: for a model that has not learned the task
    # yet, such as a tiny preset's random weights (pipelines/from_scratch.yaml). Every pipeline that
    # starts from a trained or pre-trained checkpoint (demo.yaml, the paper pipelines) sets it to
    # false: compression and fine-tuning in one pass, as in the paper.
    init_from_dense: bool = True

    def targets(self, method: str) -> list[float]:
        return self.method_targets.get(method, self.target_sparsities)

    def trials(self) -> list[tuple[str, float]]:
        """(method, target_sparsity) of every compression trial, in order."""
        return [(method, target) for method in self.methods for target in self.targets(method)]

    def problems(self, prefix: str = "sweep") -> list[str]:
        out = []
        for method in self.methods:
            if method == DENSE:
                out.append(f"{prefix}.methods: 'dense' is the baseline, not a sweep method; remove it "
                           "and set dense_baseline: true")
            elif method not in COMPRESSION_METHODS:
                out.append(f"{prefix}.methods: unknown method {method!r}; use any of {', '.join(COMPRESSION_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            out.append(f"{prefix}.methods: {self.methods} lists a method twice; list each once")
        for method in self.method_targets:
            if method not in self.methods:
                out.append(f"{prefix}.method_targets.{method}: {method!r} is not in {prefix}.methods; "
                           "add it there or remove this entry")
        target_lists = {f"{prefix}.method_targets.{method}": targets for method, targets in self.method_targets.items()}
        if any(method not in self.method_targets for method in self.methods):
            target_lists[f"{prefix}.target_sparsities"] = self.target_sparsities
        for key, targets in target_lists.items():
            if not targets:
                out.append(f"{key}: empty; list at least one target sparsity, e.g. [0.65]")
            if len(set(targets)) != len(targets):
                out.append(f"{key}: {targets} repeats a target; list each once")
            for i, target in enumerate(targets):  # the range check ("sspg" stands for any compression method)
                out += target_sparsity_problems("sspg", target, key=f"{key}[{i}]", target_basis="params")
        if self.target_basis not in TARGET_BASES:
            out.append(f"{prefix}.target_basis: {self.target_basis!r}; use params (fraction of all parameters, "
                       "the paper's figures) or gated (fraction of the gated weights)")
        if len(set(self.seeds)) != len(self.seeds) or any(seed < 0 for seed in self.seeds):
            out.append(f"{prefix}.seeds: {self.seeds} must be distinct integers >= 0, e.g. [0, 1, 2]")
        if not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 0:
            out.append(f"{prefix}.max_concurrent_trials: must be an integer >= 0 (0: as many as resources "
                       f"allow), got {self.max_concurrent_trials!r}")
        return out


@dataclass
class PipelineConfig:
    """A whole run, as a pipeline YAML describes it (read with :func:`load_pipeline`).

    The defaults are a small offline setup that the tests build on, not ``pipelines/demo.yaml``: the
    random-weight ``tiny`` preset on a synthetic corpus generated at ``corpus.root`` when missing,
    a dense "foundation" trained first, CPU workers. A YAML lists only what differs, so every
    pipeline names its model, its corpus and where its trials start (``sweep.init_from_dense``).
    """

    # Run name: Ray Train/Tune run names and the default output directory. "": the pipeline file's
    # name without .yaml (my_model.yaml: my_model; no file: default).
    name: str = ""
    # Where artifacts go (summary.md, one directory per trial; docs/architecture.md): a directory, or
    # an object-store URI (s3://bucket/x, gs://, file:///...; the run then writes a local staging copy
    # and uploads as it goes, markers last: storage.RemoteOutput). "": runs/<name> in the working
    # directory.
    output_dir: str = ""
    # Where Ray Train/Tune keep runs and checkpoints: a local or shared directory, or an object
    # store URI (s3://bucket/runs, gs://..., file:///...; pyarrow filesystems) that workers on
    # every node reach; a relative path is made absolute here. "": <output_dir>/runs.
    storage_path: str = ""
    # The default pipeline generates the synthetic corpus (CorpusConfig alone never does: a real
    # corpus path that is missing must stay an error, so YAMLs for real corpora set synth_utterances: 0).
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(synth_utterances=DEFAULT_SYNTH_UTTERANCES))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    # Also train the uncompressed model: the reference WER and size, trial "dense" (with sweep.seeds,
    # one per seed, dense-seed<k>), trained by the sweep beside the compression trials, with the same
    # start and steps. With sweep.init_from_dense the stage "baseline" first trains trial
    # "foundation", which the trials (the dense reference included) start from; with no sweep
    # methods the stage "baseline" trains "dense" alone.
    dense_baseline: bool = True
    # Training settings of the stage "baseline" that differ from `training`, e.g. {max_steps: 1000,
    # torch_threads: 2}: trial "foundation" (sweep.init_from_dense), a stand-in for a pre-trained
    # model that usually trains longer than the compression trials, or "dense" when no sweep method
    # is listed. The dense reference beside compression trials trains with `training`, like them
    # (set here, it is refused as unused).
    baseline_training: dict = field(default_factory=dict)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)  # per training run (trial)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def baseline_train_config(self, problems: list[str] | None = None) -> TrainConfig:
        """``training`` with ``baseline_training`` applied: the dense baseline's settings. Bad
        entries are added to ``problems`` (and keep ``training``'s value)."""
        return typed.build(self.training, self.baseline_training, "baseline_training.",
                           problems if problems is not None else [], typing.get_type_hints(type(self)))

    def run_storage(self) -> str:
        """Where the Ray Train/Tune runs live: ``storage_path``, or ``<output_dir>/runs``."""
        return self.storage_path or storage_join(self.output_dir, RUNS_DIR)

    def baseline_trial(self) -> str:
        """Name of the dense baseline run: ``foundation`` when the compression trials start from
        it (``sweep.init_from_dense``; the sweep then adds a ``dense`` reference trial), else ``dense``."""
        return FOUNDATION_TRIAL if self.sweep.init_from_dense else DENSE

    def compression_trials(self) -> list[tuple[str, float, int | None]]:
        """(method, target, seed) of every sweep trial: ``sweep.trials()`` once per ``sweep.seeds``
        entry (seed None: no seeds listed, ``training.seed``), preceded by ``(DENSE, 0.0, seed)``
        per seed when the sweep trains the dense references (:meth:`sweep_trains_dense`). That reference
        gets the same start and the same steps as every compressed model, so extra training never
        passes for "no loss"."""
        seeds = self.sweep.seeds or [None]
        trials = [(method, target, seed) for method, target in self.sweep.trials() for seed in seeds]
        if trials and self.sweep_trains_dense():
            trials = [(DENSE, 0.0, seed) for seed in seeds] + trials
        return trials

    def sweep_trains_dense(self) -> bool:
        """Whether the sweep trains the dense references (one per seed) beside the compression trials:
        whenever there are compression trials. Every seed is then compared with a dense run of its own
        batch order, every trial's time is measured under the same resources (a two-stage trial's
        includes its dense run's), and on a cluster with room for every trial the reference no longer
        runs alone first: the wall time of one trial, not two. On the 2-core demo it is a wash (460 s
        against 468 s: the two cores were busy either way)."""
        return bool(self.dense_baseline and self.sweep.methods)

    def runs_baseline(self) -> bool:
        """Whether the baseline stage trains a model: the foundation (``sweep.init_from_dense``), or
        the dense reference ``dense`` when there are no compression trials to train it beside."""
        return self.dense_baseline and (self.sweep.init_from_dense or not self.sweep_trains_dense())

    def problems(self) -> list[str]:
        """Every problem of the settings themselves (paths on disk: :func:`check_paths`)."""
        out = []
        baseline_problems: list[str] = []
        baseline = self.baseline_train_config(baseline_problems)
        out += baseline_problems
        if not baseline_problems and self.baseline_training:
            known = self.training.problems("baseline_training")  # reported once, under training
            out += [p for p in baseline.problems("baseline_training") if p not in known]
        if self.storage_path and (problem := scheme_problem("storage_path", self.storage_path)):
            out.append(problem)
        for key, path in (("output_dir", self.output_dir), ("data.cache_dir", self.data.cache_dir)):
            if problem := scheme_problem(key, path):
                out.append(problem)
        if not isinstance(self.name, str) or not RUN_NAME.fullmatch(self.name):
            out.append(f"name: {self.name!r} is not a valid run name; use letters, digits, '.', '_' and '-'")
        out += self.corpus.problems("corpus") + self.data.problems("data") + self.model.problems("model")
        out += self.training.problems("training") + self.gates.problems("gates") + self.sweep.problems("sweep")
        out += self.resources.problems("resources") + self.evaluation.problems("evaluation")
        if "two-stage" in self.sweep.methods and not self.dense_baseline:
            out.append("sweep.methods: two-stage prunes the finished dense trial; set dense_baseline: true, "
                       "or remove two-stage")
        if self.sweep.init_from_dense and not self.dense_baseline and self.sweep.methods:
            out.append("sweep.init_from_dense: needs the dense baseline; set dense_baseline: true, "
                       "or sweep.init_from_dense: false to start from model.init_from")
        if self.baseline_training and not self.runs_baseline():
            out.append("baseline_training: set, but no run here trains with it: the baseline stage trains "
                       "the foundation (sweep.init_from_dense: true) or, with no sweep methods, a dense model "
                       "alone; the dense reference beside compression trials trains with `training`, like "
                       "every trial. Remove baseline_training")
        if not self.sweep.methods and not self.dense_baseline:
            out.append("sweep.methods: empty and dense_baseline is false: nothing to run; list a method or "
                       "set dense_baseline: true")
        if self.corpus.synth_utterances:
            why = "set corpus.synth_utterances=0 for a real corpus"
            if local_path(self.corpus.root) is None:
                out.append(f"corpus.synth_utterances: the synthetic corpus is generated on a local disk, not "
                           f"at {self.corpus.root}; {why}, or point corpus.root at a local directory")
            if self.corpus.layout == "hf_parquet":
                out.append(f"corpus.layout: the synthetic corpus is in the librispeech layout; {why}, "
                           "or set corpus.layout=auto")
            missing = [split for split in self.corpus.splits() if split not in SYNTH_SPLITS]
            if missing:
                out.append(f"corpus.train_split/eval_splits: {missing} are not splits of the synthetic corpus "
                           f"({', '.join(SYNTH_SPLITS)}); {why}")
        return out
