"""Pipeline config: every YAML under pipelines/ validates, overrides are typed, bad input is
reported all at once (key and file named), paths are checked without writing, dump round-trips."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from pinch_ray.config import (MAGNITUDE_METHODS, METHODS, RANKED_METHODS, SYNTH_SPLITS, ConfigError, GateConfig,
                              PipelineConfig, check_paths, dump_pipeline, load_pipeline)

PIPELINES = sorted((Path(__file__).parents[1] / "pipelines").glob("*.yaml"))


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Relative paths resolve against the working directory: make it a fresh one."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def problems_of(path, overrides=(), **kwargs):
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path, overrides, **kwargs)
    return caught.value


def leaves(raw, default, prefix=""):
    """(dotted key, YAML value, default value) of every setting a YAML lists."""
    for key, value in raw.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(default[key]):
            yield from leaves(value, dataclasses.asdict(default[key]), f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, default.get(key)


def test_there_are_pipelines():
    assert {"wav2vec2_base_ls100.yaml", "hubert_large_ls100.yaml"} <= {path.name for path in PIPELINES}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda path: path.name)
def test_every_pipeline_yaml_validates(path):
    cfg = load_pipeline(path, check_paths=False)
    assert cfg.sweep.trials() or cfg.dense_baseline
    problems = check_paths(cfg)
    if cfg.corpus.synth_utterances == 0 and not Path(cfg.corpus.root).exists():  # /data/LibriSpeech here
        assert len(problems) == 1 and problems[0].startswith("corpus.root: directory")
    else:
        assert problems == []
    raw = yaml.safe_load(path.read_text())
    defaults = {field.name: getattr(PipelineConfig(), field.name) for field in dataclasses.fields(PipelineConfig)}
    same = [key for key, value, default in leaves(raw, defaults) if value == default]
    assert not same, f"{path.name} repeats defaults (list only what differs): {same}"
    assert path.read_text().startswith("#") and "pinch-ray run pipelines/" in path.read_text()


def test_librispeech_pipelines_follow_the_paper():
    cfg = load_pipeline(PIPELINES[0].with_name("wav2vec2_base_ls100.yaml"), check_paths=False)
    assert cfg.model.init_from == "facebook/wav2vec2-base" and cfg.corpus.root == "/data/LibriSpeech"
    # fractions of all parameters, as the paper counts: -65% and 4.26x (1 - 1/4.26 = 0.765)
    assert cfg.sweep.trials() == [("sspg", 0.6), ("sspg", 0.65), ("sspg", 0.7), ("sspg", 0.765), ("ump", 0.65),
                                  ("two-stage", 0.65)]
    assert cfg.sweep.target_basis == "params"
    assert cfg.training.lr == 5e-5 and cfg.training.freeze_feature_encoder and cfg.resources.use_gpu
    assert cfg.corpus.splits() == ["train-clean-100", "dev-clean", "test-clean", "test-other"]
    moved = load_pipeline(PIPELINES[0].with_name("hubert_large_ls100.yaml"), ["corpus.root=s3://bucket/ls"])
    assert moved.corpus.root == "s3://bucket/ls" and moved.model.init_from == "facebook/hubert-large-ll60k"


def test_defaults_are_a_tiny_offline_setup(in_tmp_dir):
    """The defaults (no YAML) run offline on CPU from the random-weight tiny preset, a foundation
    trained first; they are what the tests build on, not pipelines/demo.yaml (docs/configuration.md)."""
    cfg = load_pipeline(None)
    assert cfg.model.init_from == "tiny" and not cfg.resources.use_gpu and cfg.name == "default"
    assert cfg.corpus.synth_utterances > 0 and set(cfg.corpus.splits()) <= set(SYNTH_SPLITS)
    assert cfg.corpus.root == str(in_tmp_dir / "data/synth_corpus")
    assert cfg.output_dir == str(in_tmp_dir / "runs" / cfg.name)
    assert len(cfg.sweep.trials()) == 6 and cfg.sweep.init_from_dense and cfg.dense_baseline
    assert list(in_tmp_dir.iterdir()) == []  # nothing written


def test_synth_splits_match_the_generator():
    from pinch_ray.data.synth import DEFAULT_SPLITS

    assert tuple(DEFAULT_SPLITS) == SYNTH_SPLITS


def test_overrides_are_typed():
    cfg = load_pipeline(None, [
        "training.max_steps=500", "training.lr=3e-4", "training.threshold_lr=1e-3",
        "sweep.target_sparsities=[0.5,0.6]", "sweep.methods=[sspg]", "resources.cpus_per_worker=2",
        "training.adam_betas=[0.9, 0.95]", "model.overrides.layerdrop=0", "name=2024",
        "sweep.method_targets={sspg: [0.7]}", "evaluation.gpus_per_actor=0.5", "output_dir=out/x",
        "resources.cluster_max.GPU=16",
    ])
    assert cfg.training.max_steps == 500 and cfg.training.lr == 3e-4 and cfg.training.threshold_lr == 1e-3
    assert cfg.sweep.target_sparsities == [0.5, 0.6] and cfg.sweep.trials() == [("sspg", 0.7)]
    assert cfg.resources.cpus_per_worker == 2.0 and isinstance(cfg.resources.cpus_per_worker, float)
    assert cfg.training.adam_betas == (0.9, 0.95) and cfg.model.overrides == {"layerdrop": 0}
    assert cfg.name == "2024" and cfg.evaluation.gpus_per_actor == 0.5
    assert cfg.resources.cluster_max == {"GPU": 16.0} and isinstance(cfg.resources.cluster_max["GPU"], float)
    assert cfg.output_dir == str(Path.cwd() / "out/x")
    assert load_pipeline(None, ["training.threshold_lr=null"]).training.threshold_lr is None


def test_bad_overrides_are_all_reported():
    error = problems_of(None, [
        "training.max_steps=abc", "training.max_steps=5.5", "training.batch_size=true", "resources.use_gpu=1",
        "trainng.max_steps=5", "training.max_step=5", "training", "training=5",
        "sweep.target_sparsities=[0.5, x]",
    ])
    assert len(error.problems) == 9 and all(problem.startswith("override ") for problem in error.problems)
    text = str(error)
    assert "override training.max_steps=abc: training.max_steps: expected int, got 'abc'" in text
    assert "training.max_steps: expected int, got 5.5" in text
    assert "training.batch_size: expected int, got True" in text
    assert "resources.use_gpu: expected bool, got 1" in text
    assert "trainng: unknown key; did you mean training?" in text
    assert "training.max_step: unknown key; did you mean training.max_steps?" in text
    assert "expected key=value" in text and "is a section" in text
    assert "sweep.target_sparsities[1]: expected float, got 'x'" in text


BAD_YAML = """\
name: bad
output_dir: {blocker}/out     # under a regular file: cannot be created
corpus:
  root: {tmp}/no_such_corpus  # missing, and no synthetic corpus to generate
  synth_utterances: 0
training:
  max_stepz: 100              # unknown key
  lr: 1e-3                    # YAML 1.1 leaves this a string; float fields accept it
resources:
  num_workers: two            # wrong type
sweep:
  methods: [sspg, magnitude]  # unknown method
  target_sparsities: [0.5, 1.2]
"""


def test_bad_yaml_reports_every_problem_at_once(in_tmp_dir):
    (in_tmp_dir / "blocker").write_text("a file")
    path = write_yaml(in_tmp_dir / "bad.yaml", BAD_YAML.format(blocker=in_tmp_dir / "blocker", tmp=in_tmp_dir))
    error = problems_of(path)
    assert error.source == path and path in str(error)
    expected = ["training.max_stepz: unknown key; did you mean training.max_steps?",
                "resources.num_workers: expected int, got 'two'",
                "sweep.methods: unknown method 'magnitude'",
                "sweep.target_sparsities[1]: 1.2 is outside [0, 0.99]",
                f"corpus.root: directory {in_tmp_dir}/no_such_corpus does not exist",
                f"output_dir: {in_tmp_dir}/blocker/out cannot be created"]
    for start in expected:
        assert sum(problem.startswith(start) for problem in error.problems) == 1, (start, error.problems)
    assert len(error.problems) == len(expected)
    assert sorted(path.name for path in in_tmp_dir.iterdir()) == ["bad.yaml", "blocker"]  # nothing written


def test_float_fields_accept_exponent_strings_only(in_tmp_dir):
    path = write_yaml(in_tmp_dir / "p.yaml", "training:\n  lr: 5e-5\n  threshold_lr: 1E-2\n")
    cfg = load_pipeline(path)
    assert cfg.training.lr == 5e-5 and cfg.training.threshold_lr == 0.01
    error = problems_of(write_yaml(in_tmp_dir / "q.yaml", "training:\n  max_steps: 1e3\n  lr: fast\n"))
    assert len(error.problems) == 2 and "expected int, got '1e3'" in str(error) and "got 'fast'" in str(error)


@pytest.mark.parametrize("overrides, key", [
    (["sweep.init_from_dense=true", "dense_baseline=false"], "sweep.init_from_dense: needs the dense baseline"),
    (["resources.use_gpu=true", "resources.gpus_per_worker=0"], "resources.gpus_per_worker: must be > 0"),
    (["corpus.layout=hf_parquet"], "corpus.layout: the synthetic corpus"),
    (["corpus.train_split=train-clean-100"], "corpus.train_split/eval_splits:"),
    (["corpus.root=s3://bucket/x"], "corpus.synth_utterances: the synthetic corpus is generated on a local disk"),
    (["sweep.methods=[sspg, dense]"], "sweep.methods: 'dense' is the baseline"),
    (["sweep.method_targets={ump: [0.5]}", "sweep.methods=[sspg]"], "sweep.method_targets.ump: 'ump' is not"),
    (["sweep.target_sparsities=[0.5, 0.5]"], "sweep.target_sparsities: [0.5, 0.5] repeats"),
    (["sweep.methods=[]", "dense_baseline=false"], "sweep.methods: empty"),
    (["name=a/b"], "name: 'a/b' is not a valid run name"),
    (["baseline_training.max_step=5"], "baseline_training.max_step: unknown key; did you mean baseline_training.max_steps?"),
    (["baseline_training.max_steps=0"], "baseline_training.max_steps: must be a positive integer"),
    (["baseline_training.lr=fast"], "baseline_training.lr: expected float"),
    (["training.torch_threads=-1"], "training.torch_threads: must be an integer >= 0"),
    (["training.tau_start=1"], "training.tau_start: unknown key; did you mean gates.tau_start?"),
    (["training.synth_seed=1"], "training.synth_seed: unknown key; did you mean corpus.synth_seed?"),
    (["storage_path=ftp://host/runs"], "storage_path: 'ftp://host/runs' has scheme 'ftp'"),
    (["output_dir=ftp://bucket/out"], "output_dir: 'ftp://bucket/out' has scheme 'ftp'"),
    (["data.cache_dir=http://host/cache"], "data.cache_dir: 'http://host/cache' has scheme 'http'"),
    (["sweep.methods=[sspg-neuron]", "gates.neuron_units=[ffn, rows]"], "gates.neuron_units: ['ffn', 'rows']"),
    (["resources.cluster_max.cpu=200"], "resources.cluster_max.cpu: unknown resource; set CPU and/or GPU"),
    (["resources.cluster_max.GPU=-4"], "resources.cluster_max.GPU: must be >= 0"),
    (["resources.cluster_max={CPU: many}"], "resources.cluster_max.CPU: expected float"),
])
def test_impossible_combinations(overrides, key):
    error = problems_of(None, overrides)
    assert any(key in problem for problem in error.problems), error.problems


def test_object_store_outputs_are_accepted_and_the_runs_go_under_them():
    cfg = load_pipeline(None, ["output_dir=s3://bucket/out?region=eu-west-1", "data.cache_dir=gs://bucket/cache"],
                        check_paths=False)
    assert cfg.output_dir == "s3://bucket/out?region=eu-west-1" and cfg.data.cache_dir == "gs://bucket/cache"
    assert cfg.run_storage() == "s3://bucket/out/runs?region=eu-west-1"
    assert load_pipeline(None, ["output_dir=s3://b/out", "storage_path=gs://c/runs"], check_paths=False).run_storage() == "gs://c/runs"


def test_local_paths_are_made_absolute_for_workers_elsewhere(in_tmp_dir):
    cfg = load_pipeline(None, ["output_dir=out", "storage_path=shared/runs", "corpus.root=corpus",
                               "data.cache_dir=cache"], check_paths=False)
    assert (cfg.output_dir, cfg.storage_path, cfg.corpus.root, cfg.data.cache_dir) == tuple(
        str(in_tmp_dir / p) for p in ("out", "shared/runs", "corpus", "cache"))
    assert cfg.run_storage() == str(in_tmp_dir / "shared/runs")


def test_check_paths_without_creating_anything(in_tmp_dir):
    (in_tmp_dir / "file").write_text("x")
    cfg = load_pipeline(None, check_paths=False)
    assert check_paths(cfg) == []  # synthetic corpus to be generated; runs/ to be created
    cfg.corpus.synth_utterances = 0
    cfg.output_dir = str(in_tmp_dir / "file")
    cfg.data.cache_dir = "/etc/hostname/cache" if Path("/etc/hostname").is_file() else str(in_tmp_dir / "file/c")
    problems = check_paths(cfg)
    assert [problem.split(":")[0] for problem in problems] == ["corpus.root", "output_dir", "data.cache_dir"]
    assert "is a file" in problems[1] and "cannot be created" in problems[2]
    cfg.storage_path = str(in_tmp_dir / "file" / "runs")
    assert check_paths(cfg)[-1].startswith("storage_path: ") and "cannot be created" in check_paths(cfg)[-1]
    cfg.corpus.root, cfg.output_dir, cfg.data.cache_dir = "gs://b/c", str(in_tmp_dir / "out"), str(in_tmp_dir)
    cfg.storage_path = "s3://b/runs"
    assert check_paths(cfg) == []  # object stores are not checked; an existing directory is fine
    assert sorted(path.name for path in in_tmp_dir.iterdir()) == ["file"]


@pytest.mark.parametrize("path", [None, *PIPELINES], ids=lambda path: getattr(path, "name", "defaults"))
def test_dump_round_trips(path, in_tmp_dir):
    cfg = load_pipeline(path, ["training.threshold_lr=2.5e-4", "model.overrides.final_dropout=0.1",
                               "resources.cluster_max={CPU: 200, GPU: 16}"], check_paths=False)
    dumped = write_yaml(in_tmp_dir / "pipeline.yaml", dump_pipeline(cfg))
    assert load_pipeline(dumped, check_paths=False) == cfg


def test_unreadable_files_are_config_errors(in_tmp_dir):
    assert "cannot read" in str(problems_of(str(in_tmp_dir / "missing.yaml")))
    assert "not valid YAML" in str(problems_of(write_yaml(in_tmp_dir / "a.yaml", "a: [1,\n")))
    assert "top level" in str(problems_of(write_yaml(in_tmp_dir / "b.yaml", "- 1\n")))


def test_baseline_settings_and_the_fair_dense_reference():
    cfg = load_pipeline(None, ["baseline_training={max_steps: 900, lr: 3e-3}", "training.max_steps=300",
                               "sweep.target_sparsities=[0.5]", "sweep.methods=[sspg]"], check_paths=False)
    baseline = cfg.baseline_train_config()
    assert (baseline.max_steps, baseline.lr, baseline.batch_size) == (900, 3e-3, cfg.training.batch_size)
    # trials start from the baseline: it is named "foundation" and the sweep adds a dense reference
    # trained like every compression trial
    assert cfg.baseline_trial() == "foundation"
    assert cfg.compression_trials() == [("dense", 0.0, None), ("sspg", 0.5, None)]
    # repeated over seeds: one trial per seed, and a dense reference per seed
    cfg.sweep.seeds = [0, 1]
    assert cfg.compression_trials() == [("dense", 0.0, 0), ("dense", 0.0, 1), ("sspg", 0.5, 0), ("sspg", 0.5, 1)]
    assert cfg.runs_baseline()
    # one pass from a pre-trained model: the sweep still trains a dense reference per seed, each
    # seed compared with its own batch order, and the baseline stage trains nothing
    cfg.sweep.init_from_dense = False
    assert cfg.compression_trials() == [("dense", 0.0, 0), ("dense", 0.0, 1), ("sspg", 0.5, 0), ("sspg", 0.5, 1)]
    assert not cfg.runs_baseline()
    cfg.sweep.seeds = []  # no seeds: still trained beside the trials, one wave for all (not alone first)
    assert not cfg.runs_baseline() and cfg.compression_trials() == [("dense", 0.0, None), ("sspg", 0.5, None)]
    # ... so baseline settings have nothing to apply to: refused, not silently ignored
    assert "baseline_training: set, but no run here trains with it" in str(problems_of(
        None, ["baseline_training={torch_threads: 2}", "sweep.init_from_dense=false"]))
    cfg.sweep.methods = []  # no compression trials: the baseline stage trains the dense model alone
    assert cfg.baseline_trial() == "dense" and cfg.runs_baseline() and cfg.compression_trials() == []
    cfg.sweep.methods, cfg.dense_baseline = ["sspg"], False
    assert not cfg.runs_baseline() and cfg.compression_trials() == [("sspg", 0.5, None)]
    assert "sweep.seeds" in str(problems_of(None, ["sweep.seeds=[1, 1]"]))
    # a problem of training is reported once, under training
    error = problems_of(None, ["training.lr=-1", "baseline_training={max_steps: 10}"])
    assert [p.split(":")[0] for p in error.problems] == ["training.lr"]


def test_what_a_method_does_not_read_names_gate_settings_and_agrees_with_for_method():
    """GateConfig.unread_by (what lets a finished run be reused across a change) names real gate
    settings, and its layer set is exactly what for_method overrides for the magnitude and ranked
    methods: a setting for_method starts overriding must be listed, or a change of it would stop
    the sweep for nothing; one it stops overriding must leave the list, or a change of it would be
    ignored."""
    fields = {f.name for f in dataclasses.fields(GateConfig)}
    assert set(GateConfig.SSPG_ONLY + GateConfig.RANKED_ONLY + GateConfig.LAYER_SET) <= fields
    unlike = GateConfig(granularity="neuron", gate_feature_encoder=True, gate_pos_conv=True)
    for method in METHODS:
        used = unlike.for_method(method)
        overridden = {name for name in fields if getattr(used, name) != getattr(unlike, name)}
        assert overridden <= set(GateConfig.unread_by(method)), method
        if method in MAGNITUDE_METHODS + RANKED_METHODS:
            assert overridden == set(GateConfig.LAYER_SET), method
    assert "masked_update" in GateConfig.unread_by("gmp") and "masked_update" not in GateConfig.unread_by("sspg")
    assert "mask_ranking" in GateConfig.unread_by("sspg") and "mask_ranking" not in GateConfig.unread_by("parp")


def test_a_run_is_named_after_its_pipeline_file(in_tmp_dir):
    path = write_yaml(in_tmp_dir / "my_model.yaml", "training:\n  max_steps: 5\n")
    cfg = load_pipeline(path)
    assert cfg.name == "my_model" and cfg.output_dir == str(in_tmp_dir / "runs" / "my_model")
    assert load_pipeline(path, ["name=other"]).name == "other"
    assert "is not a valid run name" in str(problems_of(write_yaml(in_tmp_dir / "my model.yaml", "")))
