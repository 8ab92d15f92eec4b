"""Print the package's module table for docs/architecture.md: each module of ``bitfit_tasks``, its
layer (0 imports no other module of the package; a module sits one layer above the highest it
imports), the package modules it imports, and the first sentence of its docstring. No sizes: the
table changes when the structure does, not with every edit.

    python docs/module_graph.py            # the table, as docs/architecture.md holds it
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bitfit_tasks"


def package_imports(path: Path) -> set[str]:
    """The ``bitfit_tasks`` modules ``path`` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:  # from . import metrics
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bitfit_tasks."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if arg.value.startswith("bitfit_tasks."):
                    names.add(arg.value.split(".")[1])
            else:  # a name computed at run time: the table could not show the arrow
                raise SystemExit(f"{path.name}:{node.lineno}: a module imported by a computed name; write it as "
                                 "an import statement so the module table sees it")
    return names


def modules() -> dict[str, dict]:
    out = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        out[name] = {"doc": first.split(". ")[0].removesuffix("."),
                     "imports": sorted(package_imports(path) - {name})}
    for info in out.values():
        info["imports"] = [m for m in info["imports"] if m in out]
    return out


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


def table() -> str:
    mods = modules()
    depth = layers(mods)
    rows = ["| layer | module | imports | what it does |", "|---|---|---|---|"]
    for name in sorted(mods, key=lambda m: (-depth[m], m)):
        info = mods[name]
        rows.append(f"| {depth[name]} | `{name}` | {', '.join(info['imports']) or '–'} | "
                    f"{info['doc'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
