"""Every third-party module ``gpen/`` imports is declared: in requirements.txt, in install.py
(the two detector libraries installed without their pins) or in an optional extra of
pyproject.toml that the README names. Read from the source, so a new undeclared import (as
kornia once was: ComfyUI installs it, a CLI venv or a Ray worker does not) fails here."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST_PROVIDED = {"torch"}  # the host's own torch: never installed or pinned by the pack


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
            where[requirement_name(item)] = f"optional extra [{extra}]"
    for name in HOST_PROVIDED:
        where[name] = "the ComfyUI host"
    return where


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute, non-standard-library modules a file imports anywhere
    (also inside functions: those run too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "__future__"}


def test_every_third_party_import_of_gpen_is_declared():
    where = declared()
    providers = packages_distributions()
    undeclared = []
    for path in sorted((REPO / "gpen").glob("*.py")):
        for module in sorted(third_party_imports(path)):
            dists = {normalise(d) for d in providers.get(module, [])}
            if not dists:
                undeclared.append(f"{path.name} imports {module}, which no installed distribution provides")
            elif not dists & where.keys():
                undeclared.append(f"{path.name} imports {module} (from {', '.join(sorted(dists))}), "
                                  f"declared nowhere")
    assert not undeclared, "; ".join(undeclared)


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
    assert third_party_imports(probe) == {"kornia", "cv2"}
    assert normalise(packages_distributions()["cv2"][0]) in declared()
    assert "kornia" not in declared()
