"""Print the package's structure for docs/architecture.md: one row per sub-package of ``bitfit_tasks``
(its job, from its ``__init__`` docstring, and the sub-packages it may import), then one row per
module (its layer, the package modules it imports, the first sentence of its docstring). A module sits
one layer above the highest module it imports (layer 0 imports none). No sizes: the tables change when
the structure does, not with every edit.

It also checks the rules the layout stands for, and exits non-zero naming the first import that breaks
one: no import cycle; a sub-package imports only the sub-packages below it (``ALLOWED``); no folder holds
more than ``MAX_MODULES`` modules; no module is longer than ``MAX_LINES`` lines.

    python docs/module_graph.py            # the tables, as docs/architecture.md holds them
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bitfit_tasks"
MAX_MODULES = 16
MAX_LINES = 450

# The sub-packages from the bottom up, and what each may import (besides itself). The top-level modules
# (the public API in __init__, the ``python -m`` entry points ``sweep`` and ``analysis``) may import all.
ALLOWED: dict[str, tuple[str, ...]] = {
    "utils": (),
    "core": ("utils",),
    "delta": ("core", "utils"),
    "peft_interop": ("delta", "core", "utils"),
    "training": ("peft_interop", "delta", "core", "utils"),
    "serving": ("peft_interop", "delta", "core", "utils"),
    "tasks": ("training", "serving", "peft_interop", "delta", "core", "utils"),
    "experiments": ("tasks", "training", "serving", "peft_interop", "delta", "core", "utils"),
}


def module_name(path: Path) -> str:
    """``core/selection.py`` -> ``core.selection``; a package's ``__init__.py`` -> the package
    (``delta``); the package's own ``__init__.py`` -> ``__init__``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from."""
    parts = [] if name == "__init__" else name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def package_imports(path: Path, known: set[str]) -> set[str]:
    """The ``bitfit_tasks`` modules ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    names: set[str] = set()

    def add(base: list[str], module: str | None, imported: list[str]) -> None:
        target = base + (module.split(".") if module else [])
        for item in imported:  # `from .pkg import module` imports that module
            dotted = ".".join([*target, item])
            if dotted in known:
                names.add(dotted)
                continue
            names.add(".".join(target) or "__init__")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = _package_of(name, path)
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            add(base, node.module, [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bitfit_tasks":
            add([], ".".join(node.module.split(".")[1:]) or None, [a.name for a in node.names])
        elif isinstance(node, ast.Import):  # import bitfit_tasks.tasks.runner
            for alias in node.names:
                if alias.name.startswith("bitfit_tasks."):
                    names.add(alias.name.removeprefix("bitfit_tasks."))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if arg.value.startswith("bitfit_tasks."):
                    names.add(arg.value.removeprefix("bitfit_tasks."))
            else:  # a name computed at run time: the table could not show the arrow
                raise SystemExit(f"{path.name}:{node.lineno}: a module imported by a computed name; write it as "
                                 "an import statement so the module table sees it")
    return {n for n in names if n in known} - {name}


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return first.split(". ")[0].removesuffix(".")


def modules() -> dict[str, dict]:
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    known = set(paths)
    return {name: {"path": p, "doc": first_sentence(p), "imports": sorted(package_imports(p, known))}
            for name, p in paths.items()}


def subpackage(name: str) -> str | None:
    """The sub-package a module belongs to (None: a top-level module)."""
    head = name.split(".")[0]
    return head if head in ALLOWED else None


def layers(mods: dict[str, dict]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in seen:
            raise SystemExit(f"import cycle: {' -> '.join((*seen, name))}")
        if name not in depth:
            depth[name] = 1 + max((visit(m, (*seen, name)) for m in mods[name]["imports"]), default=-1)
        return depth[name]

    for name in mods:
        visit(name)
    return depth


def check(mods: dict[str, dict]) -> None:
    """Exit naming the first module that breaks a rule of the layout."""
    for name, info in mods.items():
        mine = subpackage(name)
        for imp in info["imports"]:
            theirs = subpackage(imp)
            if mine is not None and theirs != mine and theirs not in ALLOWED[mine]:
                raise SystemExit(f"{name} imports {imp}: sub-package {mine!r} may import only "
                                 f"{list(ALLOWED[mine]) or 'nothing else of the package'}")
        lines = len(info["path"].read_text().splitlines())
        if lines > MAX_LINES:
            raise SystemExit(f"{info['path'].relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_LINES})")
    for folder in {p["path"].parent for p in mods.values()}:
        count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
        if count > MAX_MODULES:
            raise SystemExit(f"{folder.relative_to(PACKAGE.parent)} holds {count} modules (at most {MAX_MODULES})")


def table() -> str:
    mods = modules()
    depth = layers(mods)
    check(mods)
    rows = ["| sub-package | may import | its job |", "|---|---|---|"]
    for pkg in reversed(ALLOWED):
        rows.append(f"| `{pkg}/` | {', '.join(ALLOWED[pkg]) or '–'} | {mods[pkg]['doc'].replace('|', '/')} |")
    rows += ["", "| layer | module | imports | what it does |", "|---|---|---|---|"]
    for name in sorted(mods, key=lambda m: (-depth[m], m)):
        if mods[name]["path"].name == "__init__.py" and name != "__init__" and not mods[name]["imports"]:
            continue  # a sub-package's docstring-only __init__ (its job is in the table above)
        info = mods[name]
        rows.append(f"| {depth[name]} | `{name}` | {', '.join(info['imports']) or '–'} | "
                    f"{info['doc'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
