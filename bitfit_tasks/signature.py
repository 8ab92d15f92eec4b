"""The signature of a frozen base model, which a delta records so it is never applied to another base."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .selection import head_parameter_names

# A delta records a signature of the frozen base it was trained on: per tensor its shape, dtype, sum,
# sum of squares, sum of absolute values and a strided sample of values, reduced in float64 on the
# tensor's own device (a few numbers per tensor reach the host; no copy of the backbone). A base is
# accepted when every tensor's numbers agree within the rounding of the coarser of the two dtypes,
# so the same base in fp32, bf16, fp16 or lean mode (bf16 frozen matrices) is accepted. Guarantee:
# any other checkpoint is refused, and so is a base where one weight changed by more than the worst
# case rounding of its tensor (unit roundoff x sum|w|, plus sampled values compared entry by entry);
# between two fp32 copies that is ~6e-8 x sum|w|, in bf16 ~4e-3 x sum|w|: changes smaller than the
# half-precision rounding of a tensor cannot be told apart in that precision.

SIGNATURE_SAMPLE = 8
_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
_FP16_SUBNORMAL = 2.0**-25  # half the spacing of fp16's subnormals: an absolute error per value


@torch.no_grad()
def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    flat = t.detach().reshape(-1)
    acc = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for chunk in flat.split(1 << 22):  # bounded float64 temporaries, whatever the tensor's size
        c = chunk.to(torch.float64)
        acc += torch.stack([c.sum(), (c * c).sum(), c.abs().sum()])
    n = flat.numel()
    k = min(SIGNATURE_SAMPLE, n)
    idx = torch.arange(k, device=flat.device, dtype=torch.int64) * max(n - 1, 0) // max(k - 1, 1)
    values = torch.cat([acc, flat[idx].to(torch.float64)]).tolist()  # the one device -> host transfer
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sum": values[0],
            "sumsq": values[1], "l1": values[2], "sample": values[3:]}


def base_signature(model: nn.Module, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, dict]:
    """The signature of every parameter not in ``exclude`` and not in the head: the frozen backbone a
    delta was trained on (see the comment above for what it tells apart)."""
    head = set(head_parameter_names(model))
    return {n: tensor_stats(p) for n, p in sorted(model.named_parameters(), key=lambda np: np[0])
            if n not in exclude and n not in head}


def signature_id(signature: dict[str, dict]) -> str:
    """A short identity of a signature (sha256 of its JSON), shown in model cards and ``info``."""
    return "sig-" + hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


def signature_mismatch(recorded: dict[str, dict], current: dict[str, dict]) -> str | None:
    """None when ``current`` is the base ``recorded`` describes (within the rounding of the coarser
    dtype of each tensor), else what differs first."""
    if set(recorded) != set(current):
        only = sorted(set(recorded) ^ set(current))
        return f"other tensors ({only[:2]} in one base only)"
    for name, r in recorded.items():
        c = current[name]
        if r["shape"] != c["shape"]:
            return f"{name}: shape {c['shape']}, not {r['shape']}"
        dtypes = (r["dtype"], c["dtype"])
        u = max(_UNIT_ROUNDOFF.get(d, 2.0**-8) for d in dtypes)
        tiny = _FP16_SUBNORMAL if "float16" in dtypes else 0.0
        n = 1
        for d in r["shape"]:
            n *= d
        slack = u * r["l1"] + n * tiny + 1e-9 * r["l1"]  # worst case rounding + float64 reduction
        checks = [("sum", r["sum"], c["sum"], slack), ("sum of |w|", r["l1"], c["l1"], slack),
                  ("sum of squares", r["sumsq"], c["sumsq"], (2 * u + u * u) * r["sumsq"] + 2 * tiny * r["l1"]
                   + n * tiny * tiny + 1e-9 * r["sumsq"])]
        checks += [(f"value {i}", a, b, u * abs(a) * 1.001 + tiny) for i, (a, b) in
                   enumerate(zip(r["sample"], c["sample"], strict=True))]
        for what, a, b, tol in checks:
            if not abs(a - b) <= tol:  # NaN/inf never match
                return f"{name}: {what} {b:.6g}, not {a:.6g}"
    return None


def _check_signature(signature: Any, source: str) -> None:
    """A delta JSON's ``base_signature``: tensor name -> {shape, dtype, sum, sumsq, l1, sample}."""
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    entries = signature.items() if isinstance(signature, dict) else [("", None)]
    for name, e in entries:
        ok = (isinstance(e, dict) and isinstance(e.get("shape"), list) and all(isinstance(d, int) for d in e["shape"])
              and isinstance(e.get("dtype"), str) and all(number(e.get(k)) for k in ("sum", "sumsq", "l1"))
              and isinstance(e.get("sample"), list) and all(number(v) for v in e["sample"]))
        if not ok:
            raise UsageError(f"{source}: field 'base_signature' is malformed (entry {str(name)[:60]!r}); the JSON "
                             "was edited or damaged: save the delta again.")


def legacy_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The exact fingerprint deltas saved before the signature carry: sha256 over names, shapes and
    fp32 bytes (a full host copy of the backbone; bit-exact, so only an fp32 base matches)."""
    h = hashlib.sha256()
    for name, p in sorted(named, key=lambda x: x[0]):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
