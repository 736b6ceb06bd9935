"""The architecture the layout promises: a Ray-free core, no import cycles, no private imports."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pinch_ray"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The pinch_ray modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pinch_ray"):
            for alias in node.names:  # `from pkg import submodule` depends on the submodule only
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
    return found


def test_the_core_imports_no_ray_not_even_inside_functions():
    core = [name for name in modules() if name.startswith(("pinch_ray.core", "pinch_ray.config"))]
    for name in core:
        tree = ast.parse(modules()[name].read_text())
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        assert not [n for n in names if n == "ray" or n.startswith("ray.")], name
    code = f"import sys; import {', '.join(core)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    # a package's __init__ re-exporting its own modules is not a cycle through them
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not (name.startswith(dep + ".") and known[dep].name == "__init__.py")}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", " -> ".join(path + [name, dep])
            if dep not in state:
                visit(dep, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_module_uses_another_modules_private_names():
    known = modules()
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pinch_ray"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    assert not private, f"{name} imports {node.module}.{alias.name}"
                    if f"{node.module}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"{name} uses {aliases[node.value.id]}.{node.attr}"


def declared() -> dict[str, object]:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in requirements}


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    imported = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported - set(sys.stdlib_module_names) - {"pinch_ray"}}
    missing = {name: distributions.get(name) for name in third_party
               if not any(d.lower().replace("_", "-") in declared() for d in distributions.get(name, [name]))}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_lock_file_satisfies_every_declared_range():
    lock = {}
    for line in (PACKAGE.parent / "requirements-lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name.lower().replace("_", "-")] = version
    for name, requirement in declared().items():
        assert name in lock and requirement.specifier.contains(lock[name]), (requirement, lock.get(name))
