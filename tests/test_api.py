"""The public API in a user's own training code: the plain loop of docs/api.md runs, every method
trains and exports at its target through it, and the transformers Trainer example (shortened)
reaches the target exactly, resumes from a Trainer checkpoint with the same masks and thresholds,
and writes a model stock transformers loads. Offline: the synthetic corpus and synth-tiny."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pinch_ray
from pinch_ray.core import gates
from pinch_ray.core.compressor import StepMetrics
from pinch_ray.core.models import count_parameters, load_model

from test_export import STOCK_LOADER
from test_peers import PINCHING, PinchedStep
from test_train import NO_RANDOMNESS, random_batches

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sspg", "sspg-neuron", "ump", "two-stage", "gmp", "movement", "parp", "dense")


def pruned_fraction(model) -> float:
    counts = count_parameters(model)
    return 1 - counts.nonzero / counts.total


def docs_block(heading: str) -> str:
    """The first python block under ``heading`` in docs/api.md."""
    text = (REPO / "docs" / "api.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_plain_loop_of_the_docs_runs_and_exports_the_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, processor = load_model("tiny", **NO_RANDOMNESS)
    model.train()
    namespace = {"model": model, "processor": processor, "max_steps": 3, "batches": random_batches(3, batch=2)}
    exec(compile(docs_block("A PyTorch loop of your own"), "docs/api.md", "exec"), namespace)
    pinch = namespace["pinch"]
    assert pinch.step_count == 3 and pinch.finished["calibrated"]
    exported = load_model(str(tmp_path / "out" / "pruned"))[0]
    assert abs(pruned_fraction(exported) - 0.65) < 1e-3
    assert not gates.gated_modules(exported)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_the_api_and_folds_at_its_target(method):
    model, _ = load_model("tiny", **NO_RANDOMNESS)
    model.train()
    target = 0.0 if method == "dense" else 0.5
    pinch = pinch_ray.attach(model, method, target, max_steps=4, gates=pinch_ray.GateConfig(mask_update_every=2))
    weights = pinch.weight_parameters()
    assert not {id(p) for p in weights} & {id(g.threshold) for g in gates.gates_of(model)}
    optimizer = torch.optim.AdamW(weights, lr=1e-3)
    for batch in random_batches(2, batch=2, seconds=0.5):
        (model(**batch).loss + pinch.sparsity_loss()).backward()
        optimizer.step()
        metrics = pinch.step()
        optimizer.zero_grad()
    if method.startswith("sspg"):
        assert {"lambda_1", "soft_sparsity", "tau", "threshold_grad_norm"} <= set(metrics)
    plain = pinch.finalize()
    assert plain is model and not gates.gated_modules(model) and pinch.step_count == 2
    # sspg calibrates within its bisection's grain; the others' masks are exact up to rounding per matrix
    assert abs(pruned_fraction(model) - target) < (1e-3 if method.startswith("sspg") else 1e-4)
    with pytest.raises(RuntimeError, match="folded"):
        pinch.sparsity_loss()


def test_the_masked_update_reaches_a_plain_loop_with_accumulation_unchanged():
    """gates.masked_update needs no call of its own: sparsity_loss() notes the weights before the
    step (its first call of the step, of two micro-batches here), step() scales the update."""
    moved = {}
    for masked_update in (False, True):
        model, _ = load_model("tiny", **NO_RANDOMNESS)
        model.train()
        pinch = pinch_ray.attach(model, "sspg", 0.65, max_steps=10,
                                 gates=pinch_ray.GateConfig(masked_update=masked_update, **PINCHING))
        optimizer = torch.optim.AdamW(pinch.weight_parameters(), lr=1e-3)
        step = PinchedStep(model)
        for batch in random_batches(2, batch=2, seconds=0.5):
            ((model(**batch).loss + pinch.sparsity_loss()) / 2).backward()
        optimizer.step()
        pinch.step()
        optimizer.zero_grad()
        moved[masked_update] = step.ratio()
    assert moved[False] > 0.5 and moved[True] < 0.05


def test_step_metrics_come_to_the_host_together_when_first_read():
    metrics = StepMetrics({"step": 3, "loss": torch.tensor(2.5), "norm": torch.tensor(0.25, dtype=torch.float64)})
    assert set(metrics) == {"step", "loss", "norm"} and len(metrics) == 3  # the keys: no conversion
    assert metrics["loss"] == 2.5 and {**metrics} == {"step": 3, "loss": 2.5, "norm": 0.25}
    assert all(type(value) in (int, float) for value in dict(metrics).values())


# ----------------------------------------------------------------------------------------------
# The Trainer example, shortened
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("hf_trainer_ctc", REPO / "examples" / "hf_trainer_ctc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus") / "synth")


def shortened(corpus, output_dir) -> list[str]:
    """The example's command line, a few steps long (the corpus: 64 utterances, written once)."""
    return ["--corpus", corpus, "--utterances", "64", "--output-dir", str(output_dir), "--max-steps", "4",
            "--save-steps", "2", "--logging-steps", "2", "--batch-size", "4", "--report-to", "none"]


def example_trainer(example, corpus, output_dir, *extra):
    """The example's Trainer for :func:`shortened`'s command line (and ``extra`` arguments), before
    pinch_ray is attached: what its ``main`` builds."""
    from transformers import AutoProcessor

    from pinch_ray.core.models import checkpoint_path

    args = example.parse_args(shortened(corpus, output_dir) + list(extra))
    processor = AutoProcessor.from_pretrained(checkpoint_path(args.foundation))
    example.generate_corpus(args.corpus, num_utterances=args.utterances, seed=args.seed, progress=False)
    return example.build_trainer(args, example.read_split(Path(args.corpus), "train", processor), processor)


def test_the_trainer_example_reaches_the_target_exactly_and_stock_transformers_loads_it(example, corpus,
                                                                                        tmp_path):
    result = example.main(shortened(corpus, tmp_path / "run"))
    assert result["calibrated"] and 0 <= result["dev_wer"]
    exported = tmp_path / "run" / "pruned"
    model = load_model(str(exported))[0].eval()
    assert abs(pruned_fraction(model) - 0.65) < 1e-3  # of all parameters, measured on the export
    assert result["achieved_sparsity"] == pytest.approx(pruned_fraction(model), abs=1e-6)
    # the Trainer's logs carry the gates' figures (its trainer_state.json; TensorBoard gets the same)
    history = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert logged and all({"sparsity", "soft_sparsity", "lambda_1", "tau", "target_now"} <= set(e) for e in logged)
    # stock transformers, in a process without pinch_ray, gives the same logits as the model here
    inputs = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.save(tmp_path / "logits.npy", model(inputs).logits.numpy())
    np.save(tmp_path / "inputs.npy", inputs.numpy())
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    loaded = subprocess.run([sys.executable, "-c", STOCK_LOADER, str(exported), str(tmp_path / "inputs.npy"),
                             str(tmp_path / "logits.npy")], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert float(loaded.stdout.strip().splitlines()[-1]) <= 1e-5


def test_the_masked_update_reaches_the_trainer(example, corpus, tmp_path):
    from transformers import TrainerCallback

    from pinch_ray.hf import attach

    class MeasureTheStep(TrainerCallback):  # the Trainer's steps, after PinchCallback's hooks of each
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.step = PinchedStep(model)

        def on_step_end(self, args, state, control, **kwargs):  # before on_train_end folds the gates
            self.ratio = self.step.ratio()

    moved = {}
    for masked_update in (False, True):
        trainer = example_trainer(example, corpus, tmp_path / str(masked_update), "--max-steps", "1")
        attach(trainer, "sspg", target_sparsity=0.65,
               gates=pinch_ray.GateConfig(masked_update=masked_update, **PINCHING))
        measure = MeasureTheStep()
        trainer.add_callback(measure)
        trainer.train()
        moved[masked_update] = measure.ratio
    assert moved[False] > 0.5 and moved[True] < 0.05


class Killed(Exception):
    pass


def test_a_trainer_killed_and_resumed_from_its_checkpoint_gives_the_same_masks_and_thresholds(example, corpus,
                                                                                               tmp_path):
    from transformers import TrainerCallback

    from pinch_ray.hf import PINCH_STATE, attach

    class KillAfterStep(TrainerCallback):
        """Raises as step ``step + 1`` begins, or in that step's first forward pass, after pinch_ray's
        hook has added the sparsity term and noted the weights for the masked update (``in_forward``)."""

        def __init__(self, step, in_forward=False):
            self.step, self.in_forward, self.fired = step, in_forward, False

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step != self.step or self.fired:  # once: the same Trainer may train again
                return
            self.fired = True
            if not self.in_forward:
                raise Killed

            def kill(module, inputs, outputs):
                handle.remove()
                raise Killed
            handle = model.register_forward_hook(kill)

    def run(output_dir, kill_after=None, in_forward=False):
        trainer = example_trainer(example, corpus, output_dir)
        pinch = attach(trainer, "sspg", target_sparsity=0.65)
        if kill_after:
            trainer.add_callback(KillAfterStep(kill_after, in_forward))
            with pytest.raises(Killed):
                trainer.train()
            if in_forward:  # the same Trainer trains again in the same process, as in a notebook
                trainer.train(resume_from_checkpoint=True)
                assert trainer.args.max_grad_norm == example_trainer(example, corpus, output_dir).args.max_grad_norm
        else:
            trainer.train(resume_from_checkpoint=True if (output_dir / "checkpoint-2").is_dir() else None)
        return pinch

    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", kill_after=2)
    assert not (tmp_path / "killed" / "checkpoint-4").exists()
    resumed = run(tmp_path / "killed")
    again = run(tmp_path / "again", kill_after=3, in_forward=True)  # a step after its last checkpoint
    assert resumed.step_count == straight.step_count == again.step_count == 4
    one = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    thresholds = [key for key in one if key.endswith("threshold")]
    assert len(thresholds) == 24
    for name in ("killed", "again"):
        other = load_file(tmp_path / name / "checkpoint-4" / "model.safetensors")
        assert one.keys() == other.keys()
        for key in one:  # the thresholds, the weights their masks come from, everything
            assert torch.equal(one[key], other[key]), (name, key)
        states = [torch.load(tmp_path / run_name / "checkpoint-4" / PINCH_STATE, weights_only=True)
                  for run_name in ("straight", name)]
        assert states[0]["lagrangian"]["lambda_1"] == states[1]["lagrangian"]["lambda_1"]
        for a, b in zip(states[0]["threshold_optimizer"]["state"].values(),
                        states[1]["threshold_optimizer"]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # and all finished as the same pruned model
    for finished in (resumed, again):
        for a, b in zip(straight.model.state_dict().values(), finished.model.state_dict().values()):
            assert torch.equal(a, b)
