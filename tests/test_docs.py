"""The documentation cannot go stale silently: every ``pinch-ray`` command line and every
``key=value`` setting quoted in README.md and docs/*.md is checked against the real command-line
parser and the configuration schema (nothing is trained or loaded), every relative link and every
repository path they name exists, the Python examples name functions and arguments that exist, and
the generated configuration reference matches the schema. Offline; well under a minute on a quiet
machine, nothing trained or loaded but the package and its imports."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pinch_ray.cli import build_parser
from pinch_ray.config import ConfigError, PipelineConfig, load_pipeline
from pinch_ray.config import reference

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = {name for name in PipelineConfig.__dataclass_fields__}  # top-level keys: name, corpus, ...
# The two quickstart lines: one installs and runs the demo, one installs and runs the tests (.ci/run).
DEMO_LINE = "pip install -c requirements-lock.txt -e . && pinch-ray run pipelines/demo.yaml"
TEST_LINE = 'pip install -c requirements-lock.txt -e ".[test]" && python -m pytest'
# A path in the repository, as docs quote it (a placeholder such as <name> is not checked).
UPPER_MARKDOWN = re.compile(r"(?<![\w.-])([A-Z][A-Z0-9_-]*\.md)\b")
REPO_PATH = re.compile(r"(?<![\w./-])((?:pipelines|benchmarks|tests|pinch_ray|cluster|docs|\.ci)/[\w./*<>-]*[\w>*]/?)")
# What may stand before `pinch-ray` on a command line: a timer, nice, environment assignments.
PREFIXES = {"time", "/usr/bin/time", "-v", "nice", "exec", "env"}
# A usage synopsis rather than a command line: metavariables (PIPELINE.yaml, MODEL_DIR), [optional], ...
METAVARIABLE = re.compile(r"\[.*|.*\.\.\..*|[A-Z][A-Z0-9_]*(\.yaml)?")


def _doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^ *```([^\n`]*)\n(.*?)^ *```", text, re.S | re.M)]


def prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return re.sub(r"^ *```[^\n`]*\n.*?^ *```", "", text, flags=re.S | re.M)


def inline_spans(text: str) -> list[str]:
    """Inline code, a span wrapped over lines joined with a space (a blank line ends no span)."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(text)) if "\n\n" not in span]


def shell_lines(body: str) -> list[str]:
    """The logical lines of a shell block: continuation backslashes joined."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", body).splitlines() if line.strip()]


def commands(line: str) -> list[list[str]]:
    """The ``pinch-ray`` commands of one shell line, as argument lists without ``pinch-ray``: also
    ``python -m pinch_ray.cli ...`` (e.g. after ``ray job submit ... --``), each part of ``&&``."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    found, current, previous = [], None, None
    for token in tokens + ["&&"]:
        if token in ("&&", "||", ";", "|"):
            if current is not None:
                found.append(current)
            current, previous = None, None
            continue
        if current is not None:
            current.append(token)
        elif token == "pinch-ray" and (previous is None or previous in PREFIXES or previous == "--"
                                       or re.fullmatch(r"[A-Z_]+=\S*", previous)):
            current = []
        elif token == "pinch_ray.cli" and previous == "-m":
            current = []
        previous = token
    return found


def quoted_commands() -> list[tuple[str, list[str]]]:
    """Every ``pinch-ray`` command in the docs' code blocks and inline code: ``(where, argv)``."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for language, body in fenced_blocks(text):
            if language in ("", "bash", "sh", "shell", "console"):
                for line in shell_lines(body):
                    out += [(f"{_doc_id(path)}: {line}", argv) for argv in commands(line)]
        for span in inline_spans(text):
            out += [(f"{_doc_id(path)}: `{span}`", argv) for argv in commands(span)]
    return out


def _subcommand_paths(parser: argparse.ArgumentParser, prefix=()) -> set[tuple[str, ...]]:
    paths = set()
    for action in parser._actions:  # argparse has no public view of its subcommands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.add(prefix + (name,))
                paths |= _subcommand_paths(sub, prefix + (name,))
    return paths


COMMANDS = quoted_commands()


def test_the_docs_quote_commands():
    assert len(COMMANDS) > 20 and any(argv[:1] == ["run"] for _, argv in COMMANDS)


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where[:90] for where, _ in COMMANDS])
def test_every_quoted_command_parses_and_its_settings_load(where, argv):
    """The command line parses with the real parser (a bare ``pinch-ray COMMAND`` mentioned in
    prose names a command that exists); a ``run`` command's pipeline is a file of this repository
    (or a <placeholder>), and it loads with its overrides: every key and value checked against
    the schema, paths not checked (nothing here has the corpus)."""
    parser = build_parser()
    if argv and tuple(argv) in _subcommand_paths(parser):  # a mention: `pinch-ray evaluate`
        return
    if any(METAVARIABLE.fullmatch(token) for token in argv):  # a synopsis: `pinch-ray run PIPELINE.yaml`
        _check_synopsis(parser, argv, where)
        return
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help / --version exit 0; a usage error exits 2
        assert exit_.code == 0, f"{where}: the parser refused {argv}"
        return
    if args.command != "run":
        return
    if "<" in args.pipeline:  # pinch-ray run <output_dir>/pipeline.yaml
        assert _override_problems(args.overrides) == [], where
        return
    pipeline = REPO / args.pipeline
    assert pipeline.is_file(), f"{where}: {args.pipeline} is not a file of this repository"
    try:
        load_pipeline(pipeline, args.overrides, check_paths=False)
    except ConfigError as error:
        pytest.fail(f"{where}: {error}")


def _check_synopsis(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    """A usage synopsis names a command that exists (``COMMAND`` standing for any) and options
    that command takes."""
    path = []
    for token in argv:
        if token.startswith("-") or METAVARIABLE.fullmatch(token) or tuple(path + [token]) not in _subcommand_paths(parser):
            break
        path.append(token)
    sub = parser
    for name in path:
        sub = next(action for action in sub._actions if isinstance(action, argparse._SubParsersAction)).choices[name]
    known = {option for action in sub._actions for option in action.option_strings}
    unknown = [token for token in argv if token.startswith("--") and token.split("=")[0] not in known]
    assert path or argv[0] == "COMMAND", f"{where}: no such command {argv[0]!r}"
    assert not unknown, f"{where}: {' '.join(path)} takes no {unknown}"


def _override_problems(overrides: list[str]) -> list[str]:
    """The problems of the overrides themselves (key and type), not of their combination with the
    defaults: a quoted setting is checked against the schema whatever pipeline it is used with."""
    try:
        load_pipeline(None, overrides, check_paths=False)
    except ConfigError as error:
        return [problem for problem in error.problems if problem.startswith("override ")]
    return []


def quoted_settings() -> list[tuple[str, str]]:
    """Every setting quoted in inline code outside command lines: ``key=value`` (several in one span
    too) and ``key: value`` whose key starts with a top-level key (``training.lr=3e-4``,
    ``gates.granularity: neuron``, ``output_dir=...``), as ``(where, "key=value")``."""
    out = []
    for path in DOCS:
        for span in inline_spans(path.read_text(encoding="utf-8")):
            if commands(span):
                continue
            colon = re.fullmatch(r"([a-z_]+(?:\.[A-Za-z_]+)+): (.+)", span)
            if colon and colon.group(1).split(".")[0] in SECTIONS:
                out.append((f"{_doc_id(path)}: `{span}`", f"{colon.group(1)}={colon.group(2)}"))
                continue
            try:
                tokens = shlex.split(span)
            except ValueError:
                continue
            pairs = [t for t in tokens if re.fullmatch(r"[a-z_]+(?:\.[A-Za-z_]+)*=.+", t)]
            if pairs and len(pairs) == len(tokens) and all(t.split(".")[0].split("=")[0] in SECTIONS for t in pairs):
                out += [(f"{_doc_id(path)}: `{span}`", pair) for pair in pairs]
    return out


SETTINGS = quoted_settings()


def test_the_docs_quote_settings():
    assert len(SETTINGS) > 20


@pytest.mark.parametrize("where, setting", SETTINGS, ids=[f"{where[:70]}" for where, _ in SETTINGS])
def test_every_quoted_setting_is_a_key_of_the_schema_with_a_value_of_its_type(where, setting):
    assert _override_problems([setting]) == [], where


def links(text: str) -> list[str]:
    """Targets of markdown links and images, and of HTML src/href attributes."""
    text = prose(text)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text) + re.findall(r"(?:src|href)=\"([^\"]+)\"", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *$", prose(path.read_text(encoding="utf-8")), re.M)}


@pytest.mark.parametrize("path", DOCS, ids=_doc_id)
def test_every_relative_link_resolves_to_a_file_of_the_repository(path):
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists() or REPO not in (resolved, *resolved.parents):
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_doc_id(path)}: {broken}"


@pytest.mark.parametrize("path", DOCS, ids=_doc_id)
def test_every_repository_path_named_exists(path):
    """A path such as ``pipelines/x.yaml`` or ``benchmarks/x.py`` in code or prose names a file
    or directory of this repository; no document points at files users do not have."""
    text = path.read_text(encoding="utf-8")
    missing = sorted({p for p in REPO_PATH.findall(text) if not (set(p) & set("*<>")) and not (REPO / p).exists()})
    assert not missing, f"{_doc_id(path)} names paths that are not in the repository: {missing}"
    # a capitalised Markdown name (README.md) is a file here; a team's notes beside the clone are not
    repository_names = {p.name for p in REPO.rglob("*.md") if ".git" not in p.parts}
    outside = sorted({name for name in UPPER_MARKDOWN.findall(text) if name not in repository_names})
    assert not outside, f"{_doc_id(path)} refers to {outside}, which are not in the repository"
    assert "../shared/" not in text, f"{_doc_id(path)} refers to ../shared/, which is not in the repository"


def python_blocks() -> list[tuple[str, str]]:
    return [(f"{_doc_id(path)} block {i}", body) for path in DOCS
            for i, (language, body) in enumerate(fenced_blocks(path.read_text(encoding="utf-8"))) if language == "python"]


@pytest.mark.parametrize("where, source", python_blocks(), ids=[where for where, _ in python_blocks()])
def test_python_examples_use_the_api_as_it_is(where, source):
    """Each Python example compiles, what it imports from pinch_ray exists, the attributes it
    reads from those names exist, and its calls of them pass only parameters they take."""
    tree = ast.parse(source, where)
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pinch_ray", "transformers"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and node.module.startswith("pinch_ray"):  # a submodule
                    importlib.import_module(f"{node.module}.{alias.name}")
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
            assert hasattr(names[node.value.id], node.attr), f"{where}: {node.value.id}.{node.attr} does not exist"
        if isinstance(node, ast.Call):
            target = None
            if isinstance(node.func, ast.Name) and node.func.id in names:
                target = names[node.func.id]
            elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in names:
                target = getattr(names[node.func.value.id], node.func.attr)
            if target is None or not callable(target) or getattr(target, "__module__", "").split(".")[0] != "pinch_ray":
                continue
            parameters = inspect.signature(target).parameters
            if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
                continue
            unknown = [kw.arg for kw in node.keywords if kw.arg and kw.arg not in parameters]
            assert not unknown, f"{where}: {ast.unparse(node.func)} takes no {unknown}"


def test_the_quickstart_lines_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert DEMO_LINE in readme and TEST_LINE in readme
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == TEST_LINE


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move details to docs/"


def test_the_configuration_reference_is_up_to_date():
    """docs/configuration.md holds the reference the schema generates now; after a schema change:
    python -m pinch_ray.config.reference --write"""
    current = reference.documented(reference.REFERENCE_DOC.read_text(encoding="utf-8"))
    assert current is not None, f"{reference.REFERENCE_DOC} lost its config-reference markers"
    assert current == reference.config_reference().strip(), (
        "docs/configuration.md's configuration reference is out of date: run "
        "`python -m pinch_ray.config.reference --write`")
    # every key is documented: its meaning comes from the comments beside it in schema.py
    rows = [line for line in reference.config_reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 60 and not [row for row in rows if row.endswith("|  |")]


def test_every_doc_is_reachable_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unlinked = [_doc_id(path) for path in DOCS[1:] if f"({_doc_id(path)}" not in readme]
    assert not unlinked, f"README.md links none of {unlinked}"


def test_the_docs_are_tracked_or_new_not_ignored():
    """A doc or a path it names must not be one git ignores (it would not reach users)."""
    ignored = subprocess.run(["git", "check-ignore", *map(str, DOCS)], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.strip() == ""
