"""The package layout's rules, read from every module's imports (lazy imports inside functions too):
the core (configuration, training, data, models, reporting, tuning methods, compression) never
imports a task, a benchmark, the analysis package or an entry point; tasks never import benchmarks,
analysis or entry points."""

from __future__ import annotations

import ast
import pathlib

KFT = pathlib.Path(__file__).resolve().parents[1] / "kft"
ENTRY_POINTS = {"kft.train", "kft.predict", "kft.bench", "kft.tune", "kft.explain", "kft.compare"}
CORE = ("kft.config", "kft.startup", "kft.training", "kft.data", "kft.models", "kft.reporting", "kft.methods",
        "kft.compression")
# package prefix -> the prefixes its modules must not import
FORBIDDEN = {**{core: ("kft.tasks", "kft.benchmarks", "kft.analysis", *ENTRY_POINTS) for core in CORE},
             "kft.tasks": ("kft.benchmarks", *ENTRY_POINTS)}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(KFT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kft"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kft"))
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations() -> list[str]:
    out = []
    for path in sorted(KFT.rglob("*.py")):
        module = _module_name(path)
        for owner, banned in FORBIDDEN.items():
            if not _within(module, owner):
                continue
            for imported in sorted(_imports(path)):
                if any(_within(imported, b) for b in banned):
                    out.append(f"{module} imports {imported}")
    return out


def test_the_core_never_imports_a_task_a_benchmark_analysis_or_an_entry_point():
    assert violations() == []


def test_the_rule_catches_a_lazy_import_of_a_task(tmp_path, monkeypatch):
    """The scan sees an import inside a function (the form the core used to reach tasks in)."""
    package = tmp_path / "kft" / "training"
    package.mkdir(parents=True)
    (package / "bad.py").write_text("def f():\n    from kft.tasks.causal_lm import model\n")
    monkeypatch.setattr(__import__(__name__), "KFT", tmp_path / "kft")
    assert violations() == ["kft.training.bad imports kft.tasks.causal_lm",
                            "kft.training.bad imports kft.tasks.causal_lm.model"]


def test_entry_points_stay_at_the_top_of_the_package():
    for name in ENTRY_POINTS:
        assert (KFT / f"{name.split('.')[1]}.py").exists(), name
