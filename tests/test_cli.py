"""The ``pinch-ray`` command line: help, exit codes, and bad inputs refused before anything is written."""

import subprocess
import sys
from pathlib import Path

import pytest

from pinch_ray import __version__
from pinch_ray.cli import EXIT_BAD_INPUT, EXIT_OK, build_parser, main


def test_help_names_every_command_and_the_first_step(capsys):
    assert main(["--help"]) == EXIT_OK
    text = capsys.readouterr().out
    for word in ("run", "evaluate", "corpus", "pinch-ray run pipelines/demo.yaml", "exit codes"):
        assert word in text
    assert main(["run", "--help"]) == EXIT_OK
    assert "--from-stage" in capsys.readouterr().out


def test_help_is_fast_and_version_and_verbose_work_anywhere(capsys):
    # --help must not import torch / transformers / ray (seconds): the CLI imports them per command
    code = ("import sys; from pinch_ray.cli import main; main(['--help']); main(['run', '--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"pinch-ray {__version__}"
    parser = build_parser()
    for argv in (["-v", "run", "x.yaml"], ["run", "x.yaml", "-v"], ["corpus", "synth", "out", "--verbose"]):
        assert parser.parse_args(argv).verbose is True, argv
    assert parser.parse_args(["run", "x.yaml"]).verbose is False


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def _assert_nothing_written(tmp_path: Path, before: set) -> None:
    assert {p.name for p in tmp_path.iterdir()} == before


BAD_YAMLS = {
    "unknown key": ("training:\n  max_stepz: 10\n", ["training.max_stepz: unknown key", "max_steps"]),
    "wrong type": ("training:\n  batch_size: eight\n", ["training.batch_size: expected int"]),
    "target 1.2": ("sweep:\n  target_sparsities: [0.5, 1.2]\n", ["sweep.target_sparsities[1]"]),
    "missing corpus": ("corpus:\n  root: {tmp}/no_corpus\n  synth_utterances: 0\n", ["corpus.root", "does not exist"]),
    "unwritable output": ("output_dir: {tmp}/a_file/out\n", ["output_dir:", "a_file is a file"]),
    # only the model shows these: checked on its shapes (meta device) before anything is written
    # sspg gates the conv layers too (98.7% of synth-tiny), ump its patterns alone (89.3%)
    "unreachable target": ("sweep:\n  target_sparsities: [0.5, 0.98]\n",
                           ["sweep (sspg-0.98): target_sparsity: 0.98 of all", "at most 0.977 is reachable",
                            "sweep (ump-0.98)", "at most 0.884 is reachable", "gates.patterns: ump prunes those alone"]),
    "missing checkpoint": ("model:\n  init_from: {tmp}/no_checkpoint\n", ["model.init_from: cannot load"]),
    "unknown hub id (offline)": ("model:\n  init_from: nobody/no-such-model\n",
                                 ["model.init_from: cannot load 'nobody/no-such-model'"]),
    "pattern matching nothing": ("gates:\n  patterns: ['.*no_such_layer']\n", ["gates.patterns[0]", "matches no"]),
}


@pytest.mark.parametrize("case", list(BAD_YAMLS))
def test_bad_yaml_exits_2_naming_the_problem_and_writes_nothing(case, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output_dir / cache_dir are relative: they must stay absent
    (tmp_path / "a_file").write_text("not a directory\n")
    text, expected = BAD_YAMLS[case]
    path = _write(tmp_path, text.format(tmp=tmp_path))
    before = {p.name for p in tmp_path.iterdir()}
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    for fragment in expected:
        assert fragment in caplog.text
    _assert_nothing_written(tmp_path, before)


def test_the_python_api_refuses_what_only_the_model_shows_before_writing(tmp_path, monkeypatch):
    # stages.run checks the model itself: a script that skips the CLI gets the same refusal
    from pinch_ray.config import ConfigError, load_pipeline
    from pinch_ray.pipeline import stages

    monkeypatch.chdir(tmp_path)
    text, expected = BAD_YAMLS["unreachable target"]
    cfg = load_pipeline(_write(tmp_path, text), check_paths=False)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError) as error:
        stages.run(cfg)
    for fragment in expected:
        assert fragment in str(error.value)
    _assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("where", ["local", "uri"])
def test_a_second_run_into_one_output_dir_is_refused_while_the_first_writes(where, tmp_path, monkeypatch):
    from pinch_ray import storage
    from pinch_ray.config import ConfigError, load_pipeline
    from pinch_ray.pipeline import stages

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    output_dir = str(tmp_path / "out") if where == "local" else f"file://{tmp_path / 'out'}"
    cfg = load_pipeline(_write(tmp_path, f"output_dir: {output_dir}\n"), check_paths=False)
    # the first run holds the lock on what it writes: the output directory, or its staging copy
    held = output_dir if where == "local" else storage.RemoteOutput(output_dir).local
    with storage.exclusive(held, wait=False):
        with pytest.raises(ConfigError, match=f"output_dir: another process is writing {output_dir}"):
            stages.run(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "staging" / Path(held).name).exists()


def test_every_problem_of_a_yaml_is_listed_at_once(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory\n")
    path = _write(tmp_path, "".join([
        "output_dir: {tmp}/a_file/out\n",
        "training:\n  max_stepz: 10\n  batch_size: eight\n",
        "sweep:\n  target_sparsities: [1.2]\n",
        "corpus:\n  root: {tmp}/no_corpus\n  synth_utterances: 0\n",
    ]).format(tmp=tmp_path))
    before = {p.name for p in tmp_path.iterdir()}
    assert main(["run", str(path), "resources.num_workers=two"]) == EXIT_BAD_INPUT
    for fragment in ("training.max_stepz", "training.batch_size", "sweep.target_sparsities[0]", "corpus.root",
                     "output_dir", "override resources.num_workers=two", "6 problem(s)"):
        assert fragment in caplog.text
    _assert_nothing_written(tmp_path, before)


def test_bad_arguments_exit_2(tmp_path):
    assert main(["run"]) == EXIT_BAD_INPUT  # no pipeline
    assert main(["run", "pipelines/demo.yaml", "--only", "bogus"]) == EXIT_BAD_INPUT
    assert main(["run", str(tmp_path / "missing.yaml")]) == EXIT_BAD_INPUT
    assert main(["evaluate", str(tmp_path / "no_model"), "--corpus", str(tmp_path), "--split", "test"]) == EXIT_BAD_INPUT
    assert not list(Path(tmp_path).iterdir())


def test_every_shipped_pipeline_loads():
    from pinch_ray.config import load_pipeline

    pipelines = sorted(Path(__file__).parent.parent.glob("pipelines/*.yaml"))
    assert any(p.name == "demo.yaml" for p in pipelines)
    for path in pipelines:
        load_pipeline(path, check_paths=False)
