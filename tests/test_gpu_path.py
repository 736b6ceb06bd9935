"""The path users take on GPUs, checked where CI runs (CPU): DDP as every rank builds it (one-process
gloo groups), the batches made ahead of the steps, the dev evaluation's precision, and the
refusals a driver makes before anything runs."""

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pinch_ray.config import GateConfig, TrainConfig
from pinch_ray.core.compressor import Compressor
from pinch_ray.core.models import freeze_unused_parameters, load_model
from pinch_ray.pipeline import worker

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     feat_proj_dropout=0.0, final_dropout=0.0)


@pytest.fixture
def process_group(tmp_path):
    """A one-rank gloo process group: DDP's reducer checks every step as it does across ranks."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"input_values": torch.randn(2, 16_000, generator=generator),
            "labels": torch.randint(5, 32, (2, 8), generator=generator)}


def ddp_run(method, freeze, **overrides):
    model, _ = load_model("tiny", **NO_RANDOMNESS, **overrides)
    if freeze:
        freeze_unused_parameters(model)
    run = Compressor.create(model, method, 0.5 if method != "dense" else 0.0,
                            TrainConfig(max_steps=10, warmup_steps=1), GateConfig(calibrate=False))
    run.model = worker.data_parallel(run.model, run.device)
    return run


def test_ddp_broadcasts_no_buffers(process_group):
    """Every rank holds the same gate temperatures and fixed masks: broadcasting them from rank 0
    before each forward (DDP's default) is ~85 MB a step at base size for ump, for nothing."""
    run = ddp_run("ump", freeze=True)
    assert isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    assert run.model.broadcast_buffers is False and run.model.find_unused_parameters is False
    assert any(name.endswith(".mask") for name, _ in run.model.module.named_buffers())  # ump's masks: buffers
    for seed in range(2):
        run.step([batch(seed)])
    assert run.step_count == 2


def test_a_parameter_the_settings_never_use_is_frozen_so_ddp_gets_past_step_two(process_group):
    """Channel masking without time masking: HF creates masked_spec_embed and never uses it."""
    settings = dict(mask_time_prob=0.0, mask_feature_prob=0.3, mask_feature_length=8)
    unfrozen = ddp_run("sspg", freeze=False, **settings)
    unfrozen.step([batch(0)])
    with pytest.raises(RuntimeError, match="finished reduction in the prior iteration"):
        unfrozen.step([batch(1)])  # the pitfall itself, as DDP reports it

    run = ddp_run("sspg", freeze=True, **settings)
    assert not run.unwrapped.wav2vec2.masked_spec_embed.requires_grad
    for seed in range(3):
        run.step([batch(seed)])
    assert run.step_count == 3
    # time masking on: it is used, and stays trained
    model, _ = load_model("tiny", mask_time_prob=0.05)
    assert freeze_unused_parameters(model) == [] and model.wav2vec2.masked_spec_embed.requires_grad
    model, _ = load_model("tiny", mask_time_prob=0.05, apply_spec_augment=False)
    assert freeze_unused_parameters(model) == ["wav2vec2.masked_spec_embed"]


def test_batches_are_made_ahead_in_another_thread_in_order_and_never_past_the_steps_asked():
    made, threads = [], set()

    def items():
        for index in range(100):
            made.append(index)
            threads.add(threading.get_ident())
            yield 0, index, [{"input_values": torch.full((1, 4), float(index))}]

    steps = worker.prefetch(items(), count=5, depth=2)
    got = [index for _, index, _ in steps]
    assert got == [0, 1, 2, 3, 4] and made == [0, 1, 2, 3, 4]  # the 6th is never asked for
    assert threads and threading.get_ident() not in threads

    def failing():
        yield 0, 0, []
        raise ValueError("shard gave too few batches")

    steps = worker.prefetch(failing(), count=3)
    assert next(steps)[1] == 0
    with pytest.raises(ValueError, match="too few batches"):  # at the step that needed it
        next(steps)


def test_micro_batches_resume_where_progress_stands_and_leave_it_to_the_caller():
    rows = [{"id": str(i), "audio": torch.zeros(100 + i).numpy(), "labels": [5, 6], "text": "A"}
            for i in range(24)]
    cfg = TrainConfig(batch_size=4, grad_accum_steps=2)
    progress = {"epoch": 0, "batch_in_epoch": 0}
    steps = worker._micro_batches(rows, cfg, per_epoch=6, progress=progress, bucket_window_batches=2)
    straight = [next(steps) for _ in range(5)]
    assert [(epoch, index) for epoch, index, _ in straight] == [(0, 1), (0, 3), (0, 5), (1, 1), (1, 3)]
    assert progress == {"epoch": 0, "batch_in_epoch": 0}  # made ahead: the caller records what trained
    resumed = worker._micro_batches(rows, cfg, per_epoch=6, progress={"epoch": 0, "batch_in_epoch": 4},
                                    bucket_window_batches=2)
    again = [next(resumed) for _ in range(3)]
    assert [(e, i) for e, i, _ in again] == [(0, 5), (1, 1), (1, 3)]
    for (_, _, a), (_, _, b) in zip(again, straight[2:]):
        assert [x["ids"] for x in a] == [x["ids"] for x in b]


def test_dev_evaluation_runs_under_the_training_steps_autocast(tmp_path, monkeypatch):
    """Rank 0 evaluates while the other ranks wait: in bf16 where the step trains in bf16 (a GPU;
    forced here on the CPU), with the same words as in fp32 on a random model's clear margins."""
    from test_evaluate import write_shards

    rows = write_shards(tmp_path / "dev", num_rows=4, seconds=0.6)
    monkeypatch.setattr(worker, "read_prepared_rows", lambda path: rows)
    model, processor = load_model("tiny", **NO_RANDOMNESS, mask_time_prob=0.0)
    run = Compressor.create(model, "dense", 0.0, TrainConfig(max_steps=1), GateConfig())
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_autocast_dtype("cpu")
                                                       if torch.is_autocast_enabled("cpu") else None))
    fp32 = worker._dev_scores(run, processor, str(tmp_path / "dev"), batch_size=2)
    run.autocast_dtype = torch.bfloat16  # what Compressor.create sets on a GPU with training.bf16_autocast
    bf16 = worker._dev_scores(run, processor, str(tmp_path / "dev"), batch_size=2)
    assert seen == [None, None, torch.bfloat16, torch.bfloat16]
    assert bf16["dev_cer"] == pytest.approx(fp32["dev_cer"], abs=0.05)


def test_fractional_gpus_with_several_ranks_are_refused():
    """Ray would put two ranks of one trial on one GPU; NCCL then fails with "Duplicate GPU"."""
    from pinch_ray.config import ResourcesConfig

    cluster = {"CPU": 64, "GPU": 8}
    shared = ResourcesConfig(num_workers=2, use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=4)
    (problem,) = worker.resource_problems(shared, cluster)
    assert "resources.gpus_per_worker: 0.5 with num_workers=2" in problem and "Duplicate GPU" in problem
    for fine in (ResourcesConfig(num_workers=1, use_gpu=True, gpus_per_worker=0.5),  # small trials share a GPU
                 ResourcesConfig(num_workers=2, use_gpu=True, gpus_per_worker=1),
                 ResourcesConfig(num_workers=2, use_gpu=False, gpus_per_worker=0.5)):  # ignored without GPUs
        assert worker.resource_problems(fine, cluster) == []


@pytest.mark.parametrize("overrides,expected", [
    (["resources.use_gpu=true"], "1 workers x 1 GPUs need 1 GPUs, more than the cluster has (0)"),
    (["resources.use_gpu=true", "resources.num_workers=2", "resources.gpus_per_worker=0.5",
      "resources.cluster_max={GPU: 4, CPU: 8}"], "resources.gpus_per_worker: 0.5 with num_workers=2"),
])
def test_gpus_the_cluster_cannot_give_are_refused_by_the_driver_before_anything_is_written(
        overrides, expected, ray_cluster, tmp_path, monkeypatch, caplog):
    """A new user's first try on a CPU machine: exit 2 with the reason as the last line, before
    the corpus is generated or prepared (it used to take ~1.5 minutes, then fail every trial)."""
    from pinch_ray import cli

    monkeypatch.chdir(tmp_path)  # the demo's corpus, cache and output directories are relative
    monkeypatch.setattr(cli, "_init_ray", lambda verbose: None)  # the session's cluster: 2 CPUs, no GPU
    before = sorted(tmp_path.iterdir())
    with caplog.at_level("INFO"):
        assert cli.main(["run", str(DEMO), *overrides]) == cli.EXIT_BAD_INPUT
    assert expected in caplog.records[-1].getMessage()
    assert sorted(tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------------
# Compiled gate kernels: every graph the default gating needs, and no fallback to eager
# ------------------------------------------------------------------------------------------------

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture
def gpu_compile_policy_on_cpu(monkeypatch):
    """The GPU policy (one graph per weight shape, every weight compiled) on the CPU, through
    torch.compile's "eager" backend: dynamo's guards, graphs and recompile limit as on a GPU,
    without generating code (seconds, not minutes, and no C++ compiler needed)."""
    from pinch_ray.core import masks

    monkeypatch.setitem(masks.COMPILE_OPTIONS, "cpu", {**masks.GPU_COMPILE_OPTIONS, "backend": "eager"})
    monkeypatch.setattr(masks, "CPU_COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # torch's default, whatever ran before
    masks.reset_compiled()
    yield masks
    masks.reset_compiled()


def base_size(model_type: str, layers: int = 1):
    """wav2vec2-base / HuBERT-large shapes (every transformer layer has the same shapes: one layer
    makes the same graphs as twelve or twenty-four)."""
    from transformers import HubertConfig, Wav2Vec2Config

    from pinch_ray.core.models import CHAR_VOCAB

    common = dict(num_hidden_layers=layers, vocab_size=len(CHAR_VOCAB), pad_token_id=0, ctc_zero_infinity=True,
                  mask_time_prob=0.0, layerdrop=0.0)
    if model_type == "wav2vec2-base":
        return Wav2Vec2Config(**common)  # the defaults are wav2vec2-base's
    return HubertConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, feat_extract_norm="layer",
                        do_stable_layer_norm=True, conv_bias=True, **common)


@pytest.mark.parametrize("case,graphs", [
    # the default gating of each preset and of wav2vec2-base (the feature encoder too): 8 weight
    # shapes, a forward and a backward graph each
    ("tiny", 16), ("tiny-hubert", 16), ("tiny-wavlm", 16), ("wav2vec2-base", 16),
    # the paper pipelines' gating (no feature encoder): 5 weight shapes
    ("wav2vec2_base_ls100.yaml", 10), ("hubert_large_ls100.yaml", 10),
])
def test_the_default_gating_compiles_every_graph_it_needs_and_never_falls_back(case, graphs,
                                                                               gpu_compile_policy_on_cpu):
    """One training start as a GPU worker makes it: the starting sparsity measured under no_grad,
    then a step (forward and backward kernels). Before, the positional conv's weight made a ninth
    forward graph (it needs a gradient in training, not under no_grad), torch's recompile limit (8)
    raised, and every gate ran eagerly for the rest of the process."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCTC

    from pinch_ray.config import load_pipeline

    masks = gpu_compile_policy_on_cpu
    gate_cfg, train_cfg = GateConfig(calibrate=False), TrainConfig(max_steps=2, warmup_steps=1)
    if case.endswith(".yaml"):
        cfg = load_pipeline(PIPELINES / case, check_paths=False)
        gate_cfg, train_cfg = cfg.gates, dataclasses.replace(cfg.training, max_steps=2, warmup_steps=1)
        case = "wav2vec2-base" if case.startswith("wav2vec2") else "hubert-large"
    if case in ("wav2vec2-base", "hubert-large"):
        torch.manual_seed(0)
        model = AutoModelForCTC.from_config(base_size(case))
    else:
        model, _ = load_model(case, **NO_RANDOMNESS, mask_time_prob=0.0)
    counters.clear()
    run = Compressor.create(model, "sspg", 0.5, train_cfg, gate_cfg)
    run.step([{"input_values": torch.randn(1, 8000), "labels": torch.randint(5, 32, (1, 4))}])
    assert masks.compile_report() == {"variants": graphs, "fallback": None}
    assert counters["stats"]["unique_graphs"] == graphs  # dynamo's own count: what the report says


def test_a_model_with_more_weight_shapes_than_the_recompile_limit_stays_compiled(gpu_compile_policy_on_cpu):
    masks = gpu_compile_policy_on_cpu
    threshold, tau = torch.tensor(0.5, requires_grad=True), torch.tensor(0.02)
    for rows in range(2, 14):  # 12 shapes: past torch's 8 graphs per function
        weight = torch.randn(rows, 16, requires_grad=True)
        masked, mask_sum = masks._SoftMaskedWeight.apply(weight, threshold, tau)
        (masked.sum() + mask_sum).backward()
    assert masks.compile_report() == {"variants": 24, "fallback": None}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU compile path: test_gates)")
def test_compiled_gate_kernels_equal_eager_on_a_gpu():
    """The GPU path (Inductor's Triton kernels, one graph per shape) against the eager math, on
    CUDA tensors: a compiled kernel run on CPU tensors would test the CPU backend instead."""
    from pinch_ray.core import masks

    generator = torch.Generator().manual_seed(0)
    weight, grad_out = (torch.randn(48, 144, generator=generator).cuda() for _ in range(2))
    threshold, tau, grad_sum = (torch.tensor(value, device="cuda") for value in (0.8, 0.02, 0.3))
    forward = masks._compiled_kernel(masks._soft_mask_forward, "cuda")
    backward = masks._compiled_kernel(masks._soft_mask_backward, "cuda")
    eager = masks._soft_mask_forward(weight, threshold, tau)
    for a, b in zip(eager, forward(weight, threshold, tau)):
        assert b.is_cuda
        torch.testing.assert_close(a, b)
    for regrow in (False, True):
        for a, b in zip(masks._soft_mask_backward(grad_out, grad_sum, weight, threshold, eager[2], tau, regrow),
                        backward(grad_out, grad_sum, weight, threshold, eager[2], tau, regrow)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_gives_the_fp32_loss_and_gradients_within_bf16_precision():
    """What the GPU trains with, on the CPU's bf16: the same loss, threshold gradients and weight
    gradients as fp32 to bf16's ~3 significant digits (finite alone would pass a wrong kernel)."""
    from pinch_ray.core import gates

    def loss_and_gradients(autocast: bool):
        model, _ = load_model("tiny", **NO_RANDOMNESS, mask_time_prob=0.0)
        found = gates.attach_gates(model, GateConfig(threshold_init=0.5))
        model.train()
        generator = torch.Generator().manual_seed(1)
        audio, labels = torch.randn(2, 16_000, generator=generator), torch.randint(5, 32, (2, 8), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(audio, labels=labels).loss + gates.soft_sparsity(model)
        loss.backward()
        thresholds = torch.stack([gate.threshold.grad for gate in found.values()])
        weights = torch.cat([p.grad.flatten() for name, p in model.named_parameters()
                             if p.grad is not None and "threshold" not in name])
        return loss.detach(), thresholds, weights

    (loss, thresholds, weights), (loss_bf16, thresholds_bf16, weights_bf16) = (loss_and_gradients(False),
                                                                               loss_and_gradients(True))
    assert loss_bf16.dtype == torch.float32 and loss_bf16.item() == pytest.approx(loss.item(), rel=2e-2)
    assert torch.all(thresholds_bf16 != 0)  # every gate learns
    for full, half in ((thresholds, thresholds_bf16), (weights, weights_bf16)):
        assert torch.nn.functional.cosine_similarity(full, half, dim=0) > 0.99
        assert (half.norm() / full.norm()).item() == pytest.approx(1.0, abs=0.05)


def test_the_gpu_check_runs_its_core_path_on_a_cpu():
    """benchmarks/gpu_check.sh waits for the first GPU within reach: its code must not rot before
    (the whole script: ``bash benchmarks/gpu_check.sh --dry-run``, ~35 s of CPU)."""
    from conftest import benchmark
    from pinch_ray.core import export

    gpu_check = benchmark("gpu_check")
    timing, sspg = gpu_check.step_time("tiny", "cpu", batch_size=1, seconds=0.5, steps=1, warmup=0)
    assert {"dense_step_s", "sspg_step_s", "sspg_over_dense", "sspg_goal_met"} <= set(timing)
    assert sspg.method == "sspg" and timing.get("not_measured", {}).keys() <= set(gpu_check.PEERS)
    throughput = gpu_check.evaluation(export.pruned_copy(sspg.unwrapped), "cpu", utterances=2, batch_size=2)
    assert throughput["utterances"] == 2 and throughput["fp32"]["utterances_per_s"] > 0
