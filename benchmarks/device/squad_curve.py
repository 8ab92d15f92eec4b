"""The SQuAD training-size curve of the device kit: BitFit under both recipes against full fine-tuning,
seed 1 of every cell first, every cell of a seed at once on the one GPU, until a deadline.

    python benchmarks/device/squad_curve.py --model WORK/model --train_file T --validation_file D \
        --output_dir WORK/squad --tar OUT/squad-records.tar.gz --deadline_s 300

Cells: fractions {1, 3, 10}% x {BitFit linear recipe (lr 1e-3), BitFit official recipe (constant
lr 1e-3, batch 8, best epoch), full fine-tuning (linear, lr 5e-5)}, epochs 10 / 5 / 3 by fraction (as
the committed curve), scored with the official EM/F1 on the fixed 2,000-question dev subset. Each recipe
is a ``python -m bitfit_tasks.sweep`` grid (``<output_dir>/linear``, ``<output_dir>/official``), one
worker per cell (``--shard i/n``). The records (each run's results.json and train_ids.json, each grid's
results.md, curve.md and curve.json) are packed into ``--tar`` every 15 s and at the end, so a run cut
short still returns every finished cell.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

GRIDS = {  # recipe -> methods; full fine-tuning's recipe is linear whatever --recipe says
    "linear": ["bitfit", "full"],
    "official": ["bitfit"],
}
RECORDS = ("results.json", "train_ids.json", "sweep_run.json", "results.md", "curve.md", "curve.json", "curve.png")


def pack(root: Path, tar: Path) -> int:
    """Every record below ``root`` into ``tar`` (written to a temporary name, then renamed)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name in RECORDS and "checkpoint-" not in str(p))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for p in files:
            t.add(p, arcname=str(p.relative_to(root)))
    tmp = tar.with_name(f".{tar.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(tar)
    return sum(p.name == "results.json" and p.parent.name.startswith("seed") for p in files)


def sweep_cmd(a: argparse.Namespace, recipe: str, seed: int, shard: tuple[int, int]) -> list[str]:
    runner = ["--model_name_or_path", str(a.model), "--train_file", str(a.train_file),
              "--validation_file", str(a.validation_file), "--recipe", recipe,
              "--per_device_eval_batch_size", "128", "--disable_tqdm", "true", *a.runner_args]
    if a.max_eval_samples:
        runner += ["--max_eval_samples", str(a.max_eval_samples)]
    if recipe == "official":  # best epoch, as the authors' code reports it
        runner += ["--eval_strategy", "epoch"]
    return [sys.executable, "-m", "bitfit_tasks.sweep", "--runner", "squad",
            "--fractions", *map(str, a.fractions), "--fraction_epochs", *map(str, a.epochs),
            "--methods", *GRIDS[recipe], "--seeds", str(seed), "--bias_lrs", "1e-3", "--full_lrs", "5e-5",
            "--output_dir", str(a.output_dir / recipe), "--shard", f"{shard[0]}/{shard[1]}", "--", *runner]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--train_file", type=Path, required=True)
    ap.add_argument("--validation_file", type=Path, required=True)
    ap.add_argument("--output_dir", type=Path, required=True)
    ap.add_argument("--tar", type=Path, required=True)
    ap.add_argument("--deadline_s", type=float, required=True, help="stop every run still going after this")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    ap.add_argument("--epochs", type=float, nargs="+", default=[10, 5, 3])
    ap.add_argument("--max_eval_samples", type=int, default=2000)
    ap.add_argument("runner_args", nargs=argparse.REMAINDER, help="after '--': more arguments for every run")
    a = ap.parse_args()
    a.runner_args = a.runner_args[1:] if a.runner_args[:1] == ["--"] else a.runner_args
    end = time.time() + a.deadline_s
    a.output_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(15):
            pack(a.output_dir, a.tar)

    threading.Thread(target=refresh, daemon=True).start()
    per_recipe = {r: len(a.fractions) * len(m) for r, m in GRIDS.items()}  # cells of one seed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for seed in a.seeds:
        if time.time() >= end:
            break
        logs = a.output_dir / f"seed{seed}-logs"
        logs.mkdir(exist_ok=True)
        procs = []
        for recipe, n in per_recipe.items():
            for i in range(n):
                path = logs / f"{recipe}-{i}.log"
                with open(path, "w") as log:  # the child keeps its own descriptor
                    procs.append((subprocess.Popen(sweep_cmd(a, recipe, seed, (i, n)), stdout=log,
                                                   stderr=subprocess.STDOUT, env=env), path))
        print(f"seed {seed}: {len(procs)} cells started", flush=True)
        for p, _ in procs:
            try:
                p.wait(timeout=max(1.0, end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        failed = [path for p, path in procs if p.returncode not in (0, -9)]  # -9: stopped at the deadline
        print(f"seed {seed}: done={pack(a.output_dir, a.tar)} cells so far; failed: {[f.name for f in failed]}; "
              f"{max(0, end - time.time()):.0f} s left", flush=True)
        for path in failed:
            print(path.read_text()[-1500:], flush=True)
    stop.set()
    print(f"{pack(a.output_dir, a.tar)} finished cells packed into {a.tar}", flush=True)


if __name__ == "__main__":
    main()
