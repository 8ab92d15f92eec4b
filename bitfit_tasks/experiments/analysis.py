"""The paper's Figure 1: how much each bias term changed, per layer, during fine-tuning.

Change of a bias vector b = mean over its dimensions of |b_0 - b_F| (paper, Sec. 4).

    python -m bitfit_tasks.analysis runs/rte/bitfit/lr0.001/seed1 --output figure1_rte
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.bias_maps import LAYER_TERMS, BiasMap
from ..core.selection import layer_index, select_bias_parameters
from ..utils.errors import MissingFileError, UsageError, load_pretrained


def bias_change(
    base: nn.Module, trained: dict[str, torch.Tensor], *, bias_map: BiasMap | None = None
) -> dict[str, dict[int, float]]:
    """term -> layer -> mean |b_0 - b_F| for the per-layer terms found in ``trained``."""
    params = dict(base.named_parameters())
    out: dict[str, dict[int, float]] = {}
    # add_missing: a bias BitFit added to a base built without it started at zero.
    for term, names in select_bias_parameters(base, "layers", bias_map=bias_map, add_missing=True).items():
        for name in names:
            if name not in trained:
                continue
            layer = layer_index(base, name, bias_map=bias_map)
            b0 = params[name].detach().float().cpu() if name in params else torch.zeros_like(trained[name].float())
            out.setdefault(term, {})[layer] = float((trained[name].float() - b0).abs().mean())
    if not out:
        raise UsageError("the trained tensors hold none of the base model's per-layer biases; is this "
                         "the right base model for the run?")
    return out


def write_csv(change: dict[str, dict[int, float]], path: Path) -> None:
    layers = sorted({i for v in change.values() for i in v})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["term", *[f"layer{i}" for i in layers]])
        for term, by_layer in change.items():
            w.writerow([term, *[f"{by_layer.get(i, float('nan')):.6g}" for i in layers]])


def plot_heatmap(change: dict[str, dict[int, float]], path: Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"the heatmap {path} needs matplotlib, which is not installed (the CSV beside it is "
                         "written); pip install 'bitfit-tasks[plot]' (or matplotlib).") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [t for t in LAYER_TERMS if t in change]
    layers = sorted({i for v in change.values() for i in v})
    grid = [[change[t].get(i, float("nan")) for i in layers] for t in terms]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(layers), 0.5 + 0.45 * len(terms)))
    im = ax.imshow(grid, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(i + 1) for i in layers])
    ax.set_yticks(range(len(terms)), [f"$b_{{{t}}}$" for t in terms])
    ax.set_xlabel("layer")
    ax.set_title(title or "mean |b_0 - b_F| per bias term and layer")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze_run(run_dir: str, output: str | None = None, base_model: str | None = None) -> dict:
    """Read a run's results.json + biases_and_head.safetensors; write <output>.csv and <output>.png."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    run = Path(run_dir)
    tensors_path = run / "biases_and_head.safetensors"
    if not tensors_path.exists():
        if (run / "adapter_config.json").is_file():
            raise UsageError(f"{run} is a LoRA / BEFT run (a PEFT adapter folder): it changes no bias of the model, "
                             "so there is no bias change to analyse; analyze a bias-only or full fine-tuning run.")
        raise MissingFileError(f"{tensors_path} not found; analyze a finished run_glue.py output folder.")
    results = json.loads((run / "results.json").read_text())
    base_path = base_model or results["model"]
    trained = load_file(str(tensors_path))
    config = load_pretrained(AutoConfig, base_path)
    # The backbone's pretrained biases; the head is not analysed, so its size does not matter.
    base = load_pretrained(AutoModelForSequenceClassification, base_path, config=config)
    change = bias_change(base, trained)
    stem = Path(output) if output else run / "bias_change"
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(change, stem.with_suffix(".csv"))
    title = f"{results['task'].upper()} ({results['mode']}, lr {results['learning_rate']:g}): mean |b0 - bF|"
    plot_heatmap(change, stem.with_suffix(".png"), title)
    return change


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitfit_tasks.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run_glue.py --output_dir")
    p.add_argument("--output", help="path stem for .csv and .png (default: <run_dir>/bias_change)")
    p.add_argument("--base_model", help="pretrained model the run started from (default: from results.json)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    change = analyze_run(a.run_dir, a.output, a.base_model)
    for term, by_layer in change.items():
        print(f"{term:>4}: " + " ".join(f"{v:.4f}" for _, v in sorted(by_layer.items())))


if __name__ == "__main__":
    from ..utils.launch import run_cli

    run_cli(main)
