"""The SQuAD training-size curve (the paper's Figure 2) from a finished ``--runner squad`` grid."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..utils.fileio import atomic_write_text
from .report import fmt_cell, read_results


def plot_training_size_curve(output_dir: str) -> str:
    """The paper's Figure 2: EM and F1 (mean +- std over seeds) against the training fraction, per
    method; writes curve.png, curve.md and curve.json next to the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(output_dir)
    data: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for path in sorted(root.glob("frac*/*/lr*/seed*/results.json")):
        r = read_results(path)
        frac = float(path.parts[-5].removeprefix("frac"))
        fm = r.get("saved_metrics") or r["final_metrics"]  # the saved model's scores
        cell = data[path.parts[-4]][frac]
        cell["em"].append(fm["eval_exact_match"])
        cell["f1"].append(fm["eval_f1"])
        # Recipe facts that differ between cells, so a mixed table says how each cell was made.
        for key in ("train_examples", "epochs", "learning_rate", "device"):
            if r.get(key) is not None and r[key] not in cell[key]:
                cell[key].append(r[key])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = ["| method | fraction | questions | epochs | lr | EM | F1 | seeds | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    table: dict[str, dict[str, Any]] = {}
    for method, by_frac in sorted(data.items()):
        fracs = sorted(by_frac)
        for ax, key in zip(axes, ("em", "f1"), strict=True):
            means = [statistics.fmean(by_frac[f][key]) for f in fracs]
            stds = [statistics.stdev(by_frac[f][key]) if len(by_frac[f][key]) > 1 else 0.0 for f in fracs]
            ax.errorbar([100 * f for f in fracs], means, yerr=stds, marker="o", capsize=3, label=method)
        for f in fracs:
            em, f1 = by_frac[f]["em"], by_frac[f]["f1"]
            facts = [", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in by_frac[f][k])
                     for k in ("train_examples", "epochs", "learning_rate", "device")]
            em_cell, f1_cell = fmt_cell([x / 100 for x in em]), fmt_cell([x / 100 for x in f1])
            lines.append(f"| {method} | {f:g} | {facts[0]} | {facts[1]} | {facts[2]} | {em_cell} | {f1_cell} | "
                         f"{len(em)} | {facts[3]} |")
            table.setdefault(method, {})[str(f)] = {"em": em, "f1": f1}
    all_pcts = sorted({100 * f for by_frac in data.values() for f in by_frac})
    for ax, name in zip(axes, ("Exact match", "F1"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(all_pcts, [f"{p:g}" for p in all_pcts])  # plain percentages, not 10^k
        ax.minorticks_off()
        ax.set_xlabel("% of SQuAD training questions")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SQuAD v1.1 dev: BitFit vs full fine-tuning by training-set size (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=120)
    plt.close(fig)
    md = "\n".join(lines) + "\n"
    atomic_write_text(root / "curve.md", md)
    atomic_write_text(root / "curve.json", json.dumps(table, indent=2))
    return md
