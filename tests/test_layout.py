"""The package is grouped by stage, and each stage imports only the stages below it."""

import ast
from pathlib import Path

import fundus_ensemble

PACKAGE = Path(fundus_ensemble.__file__).parent
# Lower stages first; the root modules (labels, errors, fileio, metrics) serve every stage.
STAGES = ("data", "models", "training", "evaluation", "inference", "serve")
ROOT_SHARED = {"labels", "errors", "fileio", "metrics"}


def imported_modules(path: Path) -> set[str]:
    """Absolute dotted names of the package modules that ``path`` imports."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("fundus_ensemble"):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("fundus_ensemble"))
    return names


def stage_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_each_stage_imports_only_the_stages_below_it():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        own = stage_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for name in imported_modules(path):
            target = stage_of(name)
            if own is None:
                # a root module may use another root module, but no stage unless it is an application (demo, cli)
                if path.stem in ROOT_SHARED and target is not None:
                    offences.append(f"{path.relative_to(PACKAGE)} imports {name}")
            elif target is not None and STAGES.index(target) > STAGES.index(own):
                offences.append(f"{path.relative_to(PACKAGE)} ({own}) imports {name} ({target})")
    assert not offences, "\n".join(offences)


def test_the_package_root_holds_only_shared_modules():
    root_modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert root_modules <= ROOT_SHARED | {"cli", "demo"}, root_modules - ROOT_SHARED


def test_no_two_modules_of_a_stage_import_each_other():
    """A lazy import inside a function counts too: it is how a circle hides."""
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        edges[module] = {n for n in imported_modules(path) if n != module}
    circles = sorted(
        f"{a} <-> {b}" for a, targets in edges.items() for b in targets if a < b and a in edges.get(b, set())
    )
    assert not circles, circles


def test_every_data_file_of_the_package_is_installed_with_it():
    """A file the package reads (the bundled model, the gate's retina head, the page templates) must
    match pyproject's package-data, or a wheel install lacks it and the gate fails at its first photo."""
    import fnmatch

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later (the package allows 3.10)

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fundus_ensemble"]
    files = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert files, "no data files found: the test looks in the wrong place"
    # fnmatch's * crosses "/", setuptools' does not: compare folder by folder
    left_out = [
        f
        for f in files
        if not any(f.count("/") == pattern.count("/") and fnmatch.fnmatch(f, pattern) for pattern in patterns)
    ]
    assert not left_out, f"not in pyproject's package-data: {left_out}"
