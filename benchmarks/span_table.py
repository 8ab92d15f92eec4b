"""Per-type span F1 (seqeval) of a tagging sweep, mean ± std over seeds per method, from the
last evaluation recorded in each run's ``results.json``.

    python benchmarks/span_table.py benchmarks/results/chunk/conll2000-chunk --types NP VP PP ADVP SBAR ADJP
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def fmt(xs: list[float]) -> str:
    m = 100 * statistics.mean(xs)
    return f"{m:.1f}±{100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task_dir", type=Path, help="<sweep output>/<task>, holding <method>/lr<lr>/seed<seed>/")
    p.add_argument("--types", nargs="+", required=True)
    a = p.parse_args(argv)
    print("| method | n | overall P | overall R | overall F1 | " + " | ".join(f"{t} F1" for t in a.types) + " |")
    print("|---" * (5 + len(a.types)) + "|")
    for method in sorted(d.name for d in a.task_dir.iterdir() if d.is_dir()):
        files = sorted(a.task_dir.glob(f"{method}/*/seed*/results.json"))
        runs = [json.loads(f.read_text())["history"][-1] for f in files]
        if not runs:
            continue
        cells = [fmt([r[f"eval_{k}"] for r in runs]) for k in ("precision", "recall", "f1")]
        cells += [fmt([r["eval_per_type"][t]["f1"] for r in runs]) for t in a.types]
        print(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
