"""Loading a pipeline: a YAML file plus ``key=value`` overrides -> a checked :class:`PipelineConfig`
(every problem at once, each naming its dotted key), and back to YAML (``pipeline.yaml``)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence

import yaml

from pinch_ray.config import paths, typed
from pinch_ray.config.schema import ConfigError, PipelineConfig, raise_if_problems
from pinch_ray.storage import absolute

_SECTIONS = typing.get_type_hints(PipelineConfig)  # where an unknown key may belong instead
DEFAULT_RUN_NAME = "default"  # the name of a run with neither a name nor a pipeline file


def _apply_override(raw: dict, text: str) -> str | None:
    """Set one ``dotted.key=value`` override in ``raw`` (the YAML's mapping) after checking it
    against :class:`PipelineConfig`; returns the problem instead when it is bad."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        return f"override {text!r}: expected key=value, e.g. training.max_steps=500"
    parts = key.split(".")
    owner, annotation = PipelineConfig, PipelineConfig
    for depth, part in enumerate(parts):
        if dataclasses.is_dataclass(annotation):
            owner, names = annotation, [f.name for f in dataclasses.fields(annotation)]
            if part not in names:
                return f"override {text}: {typed.unknown_key('.'.join(parts[:depth + 1]), part, names, _SECTIONS)}"
            annotation = typing.get_type_hints(owner)[part]
        elif dict in (annotation, typing.get_origin(annotation)):  # an entry of a dict field
            annotation = typing.get_args(annotation)[1] if typing.get_args(annotation) else typing.Any
        else:
            return f"override {text}: {'.'.join(parts[:depth])} has no keys below it"
    if dataclasses.is_dataclass(annotation):
        return f"override {text}: {key} is a section; set a key inside it, e.g. {key}.<key>=<value>"
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    if annotation is str and not isinstance(value, str):  # name=2024, corpus.train_split=on
        value = value_text
    value, problem = typed.check_value(value, annotation, key)
    if problem:
        return f"override {text}: {problem}"
    section = raw
    for part in parts[:-1]:
        if not isinstance(section.get(part), dict):
            section[part] = {}
        section = section[part]
    section[parts[-1]] = value
    return None


def load_pipeline(path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
                  check_paths: bool = True) -> PipelineConfig:
    """The pipeline config of a YAML file (None: all defaults) with ``key=value`` overrides applied.

    Overrides use dotted keys and YAML values: ``training.max_steps=500``, ``training.lr=3e-4``,
    ``sweep.target_sparsities=[0.5,0.6]``, ``model.overrides.layerdrop=0.0``. Values are checked
    against the field types (ints are accepted for floats, not bools for ints; float fields also
    take strings such as ``1e-3``, which YAML 1.1 leaves as text). Relative local paths
    (``corpus.root``, ``output_dir``, ``data.cache_dir``) are made absolute against the working
    directory, the one ``ray job submit --working-dir .`` runs in; URIs (s3://, gs://) are kept.
    An empty ``name`` becomes the file's name without its extension (``default`` without a file),
    and an empty ``output_dir`` ``runs/<name>``. ``model.init_from`` is kept as written.
    ``check_paths``: also report :func:`check_paths` problems (a missing corpus, an unwritable
    output directory). Nothing is created or written.

    Raises:
        ConfigError: every problem at once (unknown keys with a suggestion, wrong types, impossible
            combinations, paths), each naming its dotted key; ``source`` is the YAML file, and
            problems of an override start with ``override <key=value>``.
    """
    source = os.fspath(path) if path is not None else "the default pipeline"
    raw = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as file:
                raw = yaml.safe_load(file)
        except OSError as error:
            raise ConfigError([f"cannot read the pipeline file: {error.strerror}"], source) from error
        except yaml.YAMLError as error:
            raise ConfigError([f"not valid YAML: {error}"], source) from error
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError([f"expected key: value lines at the top level, got {type(raw).__name__}"], source)
    problems = []
    override_problems = [problem for text in overrides if (problem := _apply_override(raw, text))]
    cfg = typed.build(PipelineConfig(), raw, "", problems, _SECTIONS)
    if not cfg.name:  # a run is named after its file: my_model.yaml -> runs/my_model
        cfg.name = os.path.splitext(os.path.basename(os.fspath(path)))[0] if path is not None else DEFAULT_RUN_NAME
    cfg.output_dir = absolute(cfg.output_dir or os.path.join("runs", cfg.name))
    cfg.corpus.root = absolute(cfg.corpus.root)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.storage_path = absolute(cfg.storage_path)  # Ray's workers do not share this working directory
    problems += override_problems + cfg.problems()
    if check_paths:
        problems += paths.check_paths(cfg)
    raise_if_problems(problems, source)
    return cfg


def plain(value):
    """Tuples as lists, recursively (safe YAML has no tuples)."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def dump_pipeline(cfg: PipelineConfig) -> str:
    """``cfg`` as YAML with every key (the ``pipeline.yaml`` beside a run's outputs);
    :func:`load_pipeline` reads it back to an equal config."""
    header = "# Resolved pinch_ray pipeline config: every setting of the run.\n"
    return header + yaml.safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False, default_flow_style=False)
