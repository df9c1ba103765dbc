"""Every third-party module ``gpen/`` imports is declared: in requirements.txt, in install.py
(the two detector libraries installed without their pins) or in an optional extra of
pyproject.toml that the README names. Read from the source, so a new undeclared import (as
kornia once was: ComfyUI installs it, a CLI venv or a Ray worker does not) fails here.

Optional extras are for the command line, the cluster runner and the benchmark only: a module
the nodes import may use one only where it goes on without it (the import inside ``try`` with
an ``except ImportError``, as CodeFormer's optional architecture package), since a ComfyUI
install gets requirements.txt and install.py, never the extras."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST_PROVIDED = {"torch"}  # the host's own torch: never installed or pinned by the pack
# The modules outside the nodes' import graph: the CLI (python -m gpen), its --ray cluster runner
# and python -m gpen.bench. Only these may need an optional extra.
EXTRAS_ALLOWED = {"__main__.py", "cluster.py", "bench.py"}


def requirement_name(line: str) -> str | None:
    line = line.split("#")[0].strip()
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return normalise(match.group(0)) if match else None


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Distribution name -> where it is declared."""
    where = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if name := requirement_name(line):
            where[name] = "requirements.txt"
    install = ast.parse((REPO / "install.py").read_text())
    for node in ast.walk(install):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PACKAGES" for t in node.targets):
            for item in ast.literal_eval(node.value):
                where[requirement_name(item)] = "install.py"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extra, items in project.get("optional-dependencies", {}).items():
        for item in items:
            where.setdefault(requirement_name(item), f"optional extra [{extra}]")  # a requirement wins
    for name in HOST_PROVIDED:
        where[name] = "the ComfyUI host"
    return where


def third_party_imports(path: Path) -> dict[str, bool]:
    """Top-level name -> whether every import of it is guarded, for the absolute, non-standard-
    library modules a file imports anywhere (also inside functions: those run too). Guarded: in
    the body of a ``try`` that catches ImportError, so the code goes on without the module."""
    tree = ast.parse(path.read_text())
    guarded_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(catches_import_error(handler) for handler in node.handlers):
            guarded_nodes |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    names: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module.split(".")[0]]
        else:
            continue
        for name in modules:
            if name not in sys.stdlib_module_names and name != "__future__":
                names[name] = names.get(name, True) and id(node) in guarded_nodes
    return names


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(c, ast.Name) and c.id in ("ImportError", "ModuleNotFoundError") for c in caught)


def import_problems(path: Path, where: dict[str, str], extras_allowed: bool) -> list[str]:
    """What is wrong with the third-party imports of one module (nothing: [])."""
    providers = packages_distributions()
    problems = []
    for module, guarded in sorted(third_party_imports(path).items()):
        dists = {normalise(d) for d in providers.get(module, [])}
        declared_in = {where[d] for d in dists if d in where}
        if not dists:
            problems.append(f"{path.name} imports {module}, which no installed distribution provides")
        elif not declared_in:
            problems.append(f"{path.name} imports {module} (from {', '.join(sorted(dists))}), declared nowhere")
        elif all(w.startswith("optional extra") for w in declared_in) and not (extras_allowed or guarded):
            problems.append(f"{path.name} imports {module}, which only {', '.join(sorted(declared_in))} "
                            f"declares, without an ImportError fallback: the nodes import {path.name}, and a "
                            f"ComfyUI install gets requirements.txt and install.py only")
    return problems


def test_every_third_party_import_of_gpen_is_declared():
    where = declared()
    problems = [problem for path in sorted((REPO / "gpen").glob("*.py"))
                for problem in import_problems(path, where, path.name in EXTRAS_ALLOWED)]
    assert not problems, "; ".join(problems)


def test_optional_extras_are_named_in_the_readme():
    readme = (REPO / "README.md").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extra, items in project.get("optional-dependencies", {}).items():
        for item in items:
            assert item.split(">")[0].split("=")[0] in readme, f"extra [{extra}]: {item} is not in README.md"


def test_the_check_sees_an_undeclared_import(tmp_path):
    """The scan finds imports inside functions and from-imports, and knows their distribution."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom . import x\ndef f():\n    from kornia.filters import gaussian_blur2d\n"
                     "    import cv2.typing\n")
    assert third_party_imports(probe) == {"kornia": False, "cv2": False}
    assert normalise(packages_distributions()["cv2"][0]) in declared()
    assert "kornia" not in declared()


def test_only_the_cli_cluster_and_bench_need_optional_extras(tmp_path):
    """An extra's module in a node-path module is refused unless its import has an ImportError
    fallback; the CLI, cluster and bench modules may import it plainly."""
    where = declared()
    extra = "skimage"
    assert where["scikit-image"] == "optional extra [bench]"
    plain = tmp_path / "node_step.py"
    plain.write_text(f"def f():\n    import {extra}\n")
    guarded = tmp_path / "node_feature.py"
    guarded.write_text(f"try:\n    import {extra}\nexcept (ImportError, OSError):\n    {extra} = None\n")
    assert third_party_imports(guarded) == {extra: True}
    [problem] = import_problems(plain, where, extras_allowed=False)
    assert "without an ImportError fallback" in problem
    assert import_problems(guarded, where, extras_allowed=False) == []
    assert import_problems(plain, where, extras_allowed=True) == []
    requirement = tmp_path / "node_uses_requirement.py"
    requirement.write_text("import cv2\n")
    assert import_problems(requirement, where, extras_allowed=False) == []
