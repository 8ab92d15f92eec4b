"""Per-epoch fit table from runner records: training loss of the epoch, the fixed training sample's
score (when recorded), the dev loss and score, for each ``results.json`` given.

    python benchmarks/fit_table.py benchmarks/results/recipe-pilot/mrpc/bitfit/*/seed1/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(path: Path) -> list[str]:
    r = json.loads(path.read_text())
    key = next(k for k in (f"eval_{r['metric']}", "eval_f1", "eval_accuracy") if k in r["history"][0])
    losses = {round(e["epoch"]): e["loss"] for e in r.get("train_loss_history", []) if e.get("epoch")}
    # Records from before these fields existed say "n/r" (not recorded), never a guess.
    label = (f"{r['task']} {r['mode']} lr {r['learning_rate']:g}, {r.get('lr_scheduler_type', 'n/r')}, "
             f"batch {r.get('global_batch_size', 'n/r')}")
    out = []
    for h in r["history"]:
        ep = round(h["epoch"])
        sample = h.get(f"train_sample_{r['metric']}", h.get("train_sample_accuracy"))
        out.append(f"| {label} | {ep} | {losses.get(ep, float('nan')):.3f} | "
                   f"{'–' if sample is None else f'{100 * sample:.1f}'} | {h.get('eval_loss', float('nan')):.3f} | "
                   f"{100 * h[key]:.1f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    a = p.parse_args(argv)
    print("| run | epoch | train loss (epoch mean) | train-sample score | dev loss | dev score |")
    print("|---|---|---|---|---|---|")
    for f in a.results:
        print("\n".join(rows(f)))


if __name__ == "__main__":
    main()
