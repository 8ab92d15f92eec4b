"""How long one process takes to fingerprint a bert-base-shaped backbone (110M parameters), with the
first method (sha256 over fp32 host bytes of every frozen tensor, bit-exact, so only an fp32
base matched), the signature's first format (per-tensor float64 sums and a strided sample, within
the rounding of the coarser dtype) and the signature deltas record now (exact integer hashes of the
bf16-, fp16- and fp32-rounded bits, reduced on the tensor's device), and whether the same base in
bf16 / fp16 is accepted and one changed weight refused.

    python benchmarks/fingerprint_time.py --repeats 5 --json benchmarks/results/fingerprint_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from bitfit_tasks.core.selection import head_parameter_names
from bitfit_tasks.core.signature import base_signature, format1_stats, legacy_fingerprint, signature_mismatch
from bitfit_tasks.utils.fileio import atomic_write_text


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig()).eval()  # bert-base shape, random weights
    head = set(head_parameter_names(model))
    frozen = [(n, p) for n, p in model.named_parameters() if n not in head and not n.endswith(".bias")]
    exclude = {n for n, _ in model.named_parameters() if n.endswith(".bias")}  # BitFit's delta: the biases
    legacy_s, _ = timed(lambda: legacy_fingerprint(frozen), a.repeats)
    format1_s, _ = timed(lambda: {n: format1_stats(p) for n, p in frozen}, a.repeats)
    sig_s, sig = timed(lambda: base_signature(model, exclude=exclude), a.repeats)
    legacy = legacy_fingerprint(frozen)

    def legacy_of(m) -> str:
        return legacy_fingerprint([(n, p) for n, p in m.named_parameters() if n not in head and n not in exclude])

    accepted, legacy_accepted = {}, {}
    for dtype in (torch.bfloat16, torch.float16):
        half = BertForSequenceClassification(BertConfig()).eval()
        half.load_state_dict(model.state_dict())
        half.to(dtype)
        name = str(dtype).removeprefix("torch.")
        accepted[name] = signature_mismatch(sig, base_signature(half, exclude)) is None
        legacy_accepted[name] = legacy_of(half) == legacy
    with torch.no_grad():
        model.bert.encoder.layer[5].output.dense.weight[10, 10] += 0.05
    perturbed_refused = signature_mismatch(sig, base_signature(model, exclude)) is not None
    legacy_perturbed_refused = legacy_of(model) != legacy
    record = {
        "model": "BertForSequenceClassification(BertConfig()) — bert-base shape, random init",
        "frozen_tensors": len(frozen), "frozen_values": sum(p.numel() for _, p in frozen),
        "legacy_sha256_fp32_seconds": round(legacy_s, 4), "signature_format1_seconds": round(format1_s, 4),
        "signature_seconds": round(sig_s, 4), "signature_over_format1": round(sig_s / format1_s, 2),
        "signature_json_bytes": len(json.dumps(sig)), "accepted_in": accepted,
        "one_weight_plus_0.05_refused": perturbed_refused, "legacy_accepted_in": legacy_accepted,
        "legacy_one_weight_plus_0.05_refused": legacy_perturbed_refused,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes on the machine skew the times
        "torch": torch.__version__, "repeats": a.repeats,
    }
    print(json.dumps(record, indent=2))
    if a.json:
        atomic_write_text(Path(a.json), json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
