"""Memory of serving a PEFT BEFT adapter on a shared backbone: ``MultiTaskBitFit.add_task(name, adapter_dir)`` at
the bert-base shape (hidden 768, 12 layers, 110M parameters, random init, fp32).

The process loads the backbone and reads every tensor of it once (transformers maps the weights file
lazily, so an untouched backbone is not yet resident), then reads the adapter; a sampler thread reads
the process's resident memory (``/proc/self/statm``) every 2 ms during ``add_task``. Printed and
written to JSON: the resident memory before ``add_task``, its peak during it, and the peak's rise over
the memory before (a second copy of the base would add about the model's size, 418 MiB here).

    python benchmarks/adapter_memory.py --label after
    PYTHONPATH=/path/to/an/older/checkout python benchmarks/adapter_memory.py --label before

The bitfit_tasks that the child process imports is the one measured (PYTHONPATH picks an older checkout);
the record names its folder and git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "adapter-memory"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def make_folders(root: Path) -> tuple[Path, Path]:
    """A saved bert-base-shaped backbone and a 3-label BEFT adapter on it (b_v, the head saved whole), with the
    task config beside it, as a --mode beft run saves it."""
    import peft
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(num_labels=3)  # bert-base-uncased's shape
    T.BertModel(cfg).save_pretrained(root / "base")
    model = T.BertForSequenceClassification.from_pretrained(root / "base", config=cfg)
    pm = peft.get_peft_model(model, peft.BeftConfig(task_type="SEQ_CLS", target_modules=["value"],
                                                    base_model_name_or_path=str(root / "base")))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "beft_bias" in name:
                p.normal_(0, 0.01)
    pm.save_pretrained(str(root / "adapter"))
    model.config.save_pretrained(str(root / "adapter"))
    return root / "base", root / "adapter"


def measure(base: str, adapter: str) -> dict:
    import torch
    import transformers as T

    import bitfit_tasks
    from bitfit_tasks import MultiTaskBitFit

    torch.set_num_threads(1)
    served = MultiTaskBitFit(T.AutoModel.from_pretrained(base))
    with torch.no_grad():  # transformers maps the weights file lazily: page the backbone in, as serving does
        for p in served.backbone.parameters():
            p.sum()

    def add(name: str) -> tuple[float, float, float]:
        """(resident memory before, its peak during add_task, seconds)."""
        before = rss()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        start = time.perf_counter()
        served.add_task(name, adapter)
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
        return before, max(peak[0], rss()), seconds

    # The first add_task also imports what reading an adapter needs (peft's submodules); the second one is
    # what each further adapter costs.
    first, second = add("mnli"), add("mnli_again")
    code = Path(bitfit_tasks.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()
    n_params = sum(p.numel() for p in served.backbone.parameters())
    mib = 2**20
    return {"code": str(code), "commit": commit, "backbone_params": n_params,
            "backbone_mib": round(n_params * 4 / mib, 1), "rss_before_mib": round(first[0] / mib, 1),
            "peak_during_add_task_mib": round(first[1] / mib, 1),
            "peak_rise_mib": round((first[1] - first[0]) / mib, 1), "add_task_seconds": round(first[2], 2),
            "second_adapter_peak_rise_mib": round((second[1] - second[0]) / mib, 1),
            "second_adapter_seconds": round(second[2], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="the record's name (before / after)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes measured (default 3)")
    p.add_argument("--child", nargs=2, metavar=("BASE", "ADAPTER"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(*a.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = make_folders(Path(tmp))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        runs = []
        for _ in range(a.repeats):
            proc = subprocess.run([sys.executable, __file__, "--label", a.label, "--child", str(base), str(adapter)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rises = sorted(r["peak_rise_mib"] for r in runs)
    seconds = sorted(r["second_adapter_peak_rise_mib"] for r in runs)
    record = {"label": a.label, "machine": os.uname().machine, "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "code": runs[0]["code"], "commit": runs[0]["commit"],
              "backbone_mib": runs[0]["backbone_mib"], "peak_rise_mib_median": rises[len(rises) // 2],
              "peak_rise_mib_max": rises[-1], "second_adapter_peak_rise_mib_median": seconds[len(seconds) // 2],
              "runs": runs}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{a.label}.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_path, path)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
