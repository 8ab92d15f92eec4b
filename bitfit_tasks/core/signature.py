"""The signature of a frozen base model, which a delta records so it is never applied to another base."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.errors import UsageError
from .quantized import canonical_packed, is_packed, logical_shape, packed_kind
from .selection import head_parameter_names

# A delta records, per frozen tensor, its shape, dtype and exact integer hashes of its values
# rounded to bf16 and to fp16: per chunk of 2^15 values, the sum over places i of w_i x bits_i, with
# bits_i the 16-bit pattern of value i and w_i a fixed pseudo-random permutation of 1..32768 over places
# (int32 products, int64 sums: all exact), computed on the tensor's own device; only the chunk sums
# reach the host (one transfer per device), where sha256 condenses them. One changed value always
# changes its chunk's sum (w_i != 0), and so does a swap of two values (the weights of a chunk are
# distinct); other moves (rows swapped, values shifted) change it unless their weighted differences
# cancel exactly. It guards against mistakes, not against a base forged to match.
# Which hash is compared depends on the two dtypes (the record's and the base's): fp32, bf16 or
# lean (bf16 matrices, fp32 vectors) against an fp32 or bf16 record: the bf16-rounded bits, which
# the same checkpoint gives in each of these; fp16 against an fp32 or fp16 record, or fp32 against
# an fp16 record: the fp16-rounded bits; fp32 against fp32: both. All exact. Only fp16 against a
# bf16 record, or bf16 against an fp16 record, cannot be exact (the two roundings of one value
# differ in ~6% of values): there each tensor's sum of |w| and max |w| are compared within the
# rounding of both dtypes, which tells another checkpoint apart but not a moved value or an edit
# smaller than that slack (about 2^-8 x sum |w| of the tensor).

SIGNATURE_FORMAT = 2
CHUNK = 1 << 15
# Values hashed per step on a CPU: one chunk. Larger steps (several chunks as the rows of one
# matrix) need fewer operations but MB-sized temporaries, measured 3-10x slower on a busy 2-core
# CPU; an accelerator takes 256 chunks per step (fewer kernel launches; the sums are the same).
_CPU_BLOCK = CHUNK
_DEVICE_BLOCK = CHUNK << 8
_HASHES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
_FP16_SUBNORMAL = 2.0**-25  # half the spacing of fp16's subnormals: an absolute error per value


def _kind(dtype: str) -> str:
    return {"float32": "fp32", "float64": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, "other")


def _weights(device: torch.device) -> torch.Tensor:
    """w_i for the places of a chunk: a fixed pseudo-random permutation of 1..2^15 (odd multipliers and
    xor-shifts modulo 2^15 are bijections), the same on every machine and device. Distinct weights
    make any swap of two values within a chunk change its sum: (w_i - w_j)(x_j - x_i) != 0."""
    h = np.arange(CHUNK, dtype=np.int64)
    for mult, shift in ((0x9E37, 7), (0x6A5D, 8), (0x2C1B, 6)):
        h = (h * mult) % CHUNK
        h ^= h >> shift
    return torch.from_numpy((h + 1).astype(np.int32)).to(device)


def _chunk_sums(block: torch.Tensor, dtype: torch.dtype, w: torch.Tensor) -> torch.Tensor:
    """Per chunk of ``block``: sum of w_i x (16-bit pattern of value i rounded to ``dtype``); a short
    last chunk is padded with zeros, which add nothing."""
    bits = block.to(dtype).view(torch.int16).to(torch.int32)  # |bits x w| <= 2^30: exact in int32
    if bits.numel() % CHUNK:
        bits = torch.nn.functional.pad(bits, (0, CHUNK - bits.numel() % CHUNK))
    return (bits.view(-1, CHUNK) * w).sum(dim=1)  # int64


@torch.no_grad()
def sign(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, dict]:
    """The signature of the named tensors (see the comment above): the one place signatures are
    built. Each tensor is reduced on its own device; its numbers reach the host in one transfer per
    device (chunk sums stay below 2^45, so float64 holds them exactly)."""
    weights: dict[torch.device, torch.Tensor] = {}
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    packed: dict[str, dict] = {}
    for name, t in sorted(named, key=lambda nt: nt[0]):
        flat = t.detach().reshape(-1)
        w = weights.setdefault(flat.device, _weights(flat.device))
        if is_packed(t):
            packed[name] = _packed_entry(t, w)
            continue
        sums: dict[str, list[torch.Tensor]] = {h: [] for h in _HASHES}
        l1 = torch.zeros((), dtype=torch.float64, device=flat.device)
        top = torch.zeros((), dtype=flat.dtype, device=flat.device)
        step = _CPU_BLOCK if flat.device.type == "cpu" else _DEVICE_BLOCK
        for block in flat.split(step) if flat.numel() else []:
            for h, dtype in _HASHES.items():
                sums[h].append(_chunk_sums(block, dtype, w))
            a = block.abs()
            l1 += a.sum(dtype=torch.float64)
            top = torch.maximum(top, a.max())
        numbers = [torch.cat(sums[h]).to(torch.float64) if sums[h] else l1.new_zeros(0) for h in _HASHES]
        pending.append((name, t, torch.cat([*numbers, l1.view(1), top.to(torch.float64).view(1)])))
    host: dict[str, list[float]] = {}
    for device in {numbers.device for *_, numbers in pending}:
        mine = [(name, numbers) for name, _, numbers in pending if numbers.device == device]
        values = torch.cat([n for _, n in mine]).tolist()  # the one device -> host transfer
        at = 0
        for name, numbers in mine:
            host[name], at = values[at:at + numbers.numel()], at + numbers.numel()
    out: dict[str, dict] = {}
    for name, t, _ in pending:
        values = host[name]
        n_chunks = (len(values) - 2) // len(_HASHES)
        entry: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for k, h in enumerate(_HASHES):
            per_chunk = [int(v) for v in values[k * n_chunks:(k + 1) * n_chunks]]
            entry[h] = hashlib.sha256(json.dumps([entry["shape"], per_chunk]).encode()).hexdigest()[:32]
        entry["l1"], entry["max"] = values[-2], values[-1]
        out[name] = entry
    return {**out, **packed}


def _packed_entry(t: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    """A quantized weight's entry: the shape of the matrix it stands for, how it is stored (``bnb-nf4``, ...) and
    one exact hash of its codes and scales (their bytes in one layout, :func:`canonical_packed`, weighted per chunk
    as above, on the tensor's device).
    Two loads of one checkpoint with one quantization config give the same hash; a full-precision load of it
    cannot be compared value by value (see :func:`signature_mismatch`)."""
    sums = []
    for part in canonical_packed(t):
        raw = part.detach().contiguous().reshape(-1).view(torch.uint8).to(torch.int32)  # <= 255 x 2^15: exact
        if raw.numel() % CHUNK:
            raw = torch.nn.functional.pad(raw, (0, CHUNK - raw.numel() % CHUNK))
        sums.append([int(v) for v in (raw.view(-1, CHUNK) * w).sum(dim=1).tolist()])
    shape = logical_shape(t)

    def digest(parts: list[list[int]]) -> str:
        return hashlib.sha256(json.dumps([shape, [v for p in parts for v in p]]).encode()).hexdigest()[:32]

    # "packed": codes and scales, what must match; "codes" alone tells which of the two differs.
    return {"shape": shape, "dtype": packed_kind(t), "packed": digest(sums), "codes": digest(sums[:1])}


def base_signature(model: nn.Module, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, dict]:
    """The signature of every parameter not in ``exclude`` and not in the head: the frozen backbone a
    delta was trained on (see the comment above for what it tells apart)."""
    return sign(frozen_tensors(model, exclude))


def frozen_tensors(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, torch.Tensor]]:
    """The named parameters a signature covers: all but ``exclude`` (a delta's tensors) and the head."""
    skip = set(exclude) | set(head_parameter_names(model))
    return [(n, p) for n, p in model.named_parameters() if n not in skip]


def signature_id(signature: dict[str, dict]) -> str:
    """A short identity of a signature (sha256 of its JSON), shown in model cards and ``info``."""
    return "sig-" + hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


def _exact_hashes(recorded: str, current: str) -> list[str]:
    """The hashes that tell these two dtypes' values apart exactly (see the comment above)."""
    kinds = {_kind(recorded), _kind(current)}
    return [h for h in _HASHES if kinds <= {"fp32", h}]


def _layout_mismatch(recorded: dict[str, dict], current: dict[str, dict]) -> str | None:
    """Other tensor names or shapes: a different model, whatever the values."""
    if set(recorded) != set(current):
        only = sorted(set(recorded) ^ set(current))
        return f"other tensors ({only[:2]} in one base only)"
    for name, r in recorded.items():
        if r["shape"] != current[name]["shape"]:
            return f"{name}: shape {current[name]['shape']}, not {r['shape']}"
    return None


def signature_mismatch(recorded: dict[str, dict], current: dict[str, dict]) -> str | None:
    """None when ``current`` is the base ``recorded`` describes, else what differs first: exact
    wherever the two dtypes allow it, within the rounding of both where they do not (fp16 against
    bf16). A recorded signature of the first format (float sums) is compared the first format's way."""
    layout = _layout_mismatch(recorded, current)
    if layout is not None:
        return layout
    for name, r in recorded.items():
        c = current[name]
        if "packed" in r or "packed" in c:
            # Quantized in one load or both: the same quantization must give the same codes and scales; a
            # quantized and a full-precision load of one checkpoint share names and shapes only (checked above),
            # and the tensors both hold in floating point (embeddings, norms) are compared exactly.
            if "packed" in r and "packed" in c and (r["dtype"], r["packed"]) != (c["dtype"], c["packed"]):
                part = "scales" if r.get("codes") is not None and r.get("codes") == c.get("codes") else "codes"
                how = f"stored {c['dtype']}, recorded {r['dtype']}" if r["dtype"] != c["dtype"] else \
                    f"its {r['dtype']} {part} differ (hash {c['packed'][:12]}, recorded {r['packed'][:12]})"
                return f"{name}: {how}"
            continue
        exact = _exact_hashes(r["dtype"], c["dtype"])
        for h in exact:
            if r[h] != c[h]:
                return f"{name}: its {h}-rounded values differ (hash {c[h][:12]}, recorded {r[h][:12]})"
        if exact:
            continue
        u = _UNIT_ROUNDOFF.get(r["dtype"], 2.0**-8) + _UNIT_ROUNDOFF.get(c["dtype"], 2.0**-8)
        n = int(np.prod(r["shape"], dtype=np.int64))
        tiny = _FP16_SUBNORMAL
        for what, tol in (("l1", u * r["l1"] + n * tiny + 1e-9 * r["l1"]), ("max", u * r["max"] + tiny)):
            if not abs(r[what] - c[what]) <= tol:  # NaN/inf never match
                label = "sum of |w|" if what == "l1" else "max |w|"
                return f"{name}: {label} {c[what]:.6g}, not {r[what]:.6g} ({r['dtype']} record, {c['dtype']} base)"
    return None


def base_mismatch(meta: dict[str, Any], frozen: list[tuple[str, torch.Tensor]],
                  signature: dict[str, dict] | None = None) -> str | None:
    """None when ``frozen`` (the named tensors outside a delta and its head) is the base a delta with
    ``meta`` was trained on, else what differs. ``signature``: their signature, if taken already.
    Reads all three records: this format, the first format (float sums, before exact hashes) and
    the fingerprint of deltas saved before signatures (bit-exact fp32 only)."""
    recorded = meta.get("base_signature")
    fingerprint = str(meta.get("base_fingerprint", ""))
    if recorded is None:
        got = legacy_fingerprint(frozen)
        return None if got == fingerprint else (
            f"fingerprint {fingerprint[:12]}… vs this model's {got[:12]}…; this delta predates dtype-tolerant "
            "checks, so the base must be loaded in fp32")
    if _format(recorded) == 1:
        why = _format1_mismatch(recorded, {n: format1_stats(t) for n, t in frozen})
    else:
        why = signature_mismatch(recorded, signature if signature is not None else sign(frozen))
    return None if why is None else f"{why}; fingerprint {fingerprint[:16]}…"


def _format(signature: dict[str, dict]) -> int:
    return 1 if signature and all(isinstance(e, dict) and "sum" in e for e in signature.values()) else SIGNATURE_FORMAT


def check_signature_field(signature: Any, source: str) -> None:
    """A delta JSON's ``base_signature``: tensor name -> {shape, dtype, bf16, fp16, l1, max}, or
    the first format's {shape, dtype, sum, sumsq, l1, sample}; anything else is one line."""
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def digest(v: Any) -> bool:
        return isinstance(v, str) and len(v) == 32 and all(ch in "0123456789abcdef" for ch in v)

    entries = signature.items() if isinstance(signature, dict) else [("", None)]
    first = _format(signature) == 1 if isinstance(signature, dict) else False
    for name, e in entries:
        ok = (isinstance(e, dict) and isinstance(e.get("shape"), list) and all(isinstance(d, int) for d in e["shape"])
              and isinstance(e.get("dtype"), str))
        if ok and first:
            ok = (all(number(e.get(k)) for k in ("sum", "sumsq", "l1")) and isinstance(e.get("sample"), list)
                  and all(number(v) for v in e["sample"]))
        elif ok and "packed" in e:
            ok = digest(e.get("packed")) and (e.get("codes") is None or digest(e.get("codes")))
        elif ok:
            ok = all(digest(e.get(h)) for h in _HASHES) and all(number(e.get(k)) for k in ("l1", "max"))
        if not ok:
            raise UsageError(f"{source}: field 'base_signature' is malformed (entry {str(name)[:60]!r}); the JSON "
                             "was edited or damaged: save the delta again.")


# ---- the first format (kept to check deltas saved with it) --------------------------------------
# Per tensor: float64 sum, sum of squares, sum of |w| and 8 strided values, compared within the worst
# case rounding of the coarser dtype. Permutation-blind and, in bf16, blind to edits below
# 2^-8 x sum|w|: deltas saved with it are checked as before, new deltas record the exact hashes.

_FORMAT1_SAMPLE = 8


@torch.no_grad()
def format1_stats(t: torch.Tensor) -> dict[str, Any]:
    flat = t.detach().reshape(-1)
    acc = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for chunk in flat.split(1 << 22):
        c = chunk.to(torch.float64)
        acc += torch.stack([c.sum(), (c * c).sum(), c.abs().sum()])
    n = flat.numel()
    k = min(_FORMAT1_SAMPLE, n)
    idx = torch.arange(k, device=flat.device, dtype=torch.int64) * max(n - 1, 0) // max(k - 1, 1)
    values = torch.cat([acc, flat[idx].to(torch.float64)]).tolist()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sum": values[0],
            "sumsq": values[1], "l1": values[2], "sample": values[3:]}


def _format1_mismatch(recorded: dict[str, dict], current: dict[str, dict]) -> str | None:
    layout = _layout_mismatch(recorded, current)
    if layout is not None:
        return layout
    for name, r in recorded.items():
        c = current[name]
        dtypes = (r["dtype"], c["dtype"])
        u = max(_UNIT_ROUNDOFF.get(d, 2.0**-8) for d in dtypes)
        tiny = _FP16_SUBNORMAL if "float16" in dtypes else 0.0
        n = int(np.prod(r["shape"], dtype=np.int64))
        slack = u * r["l1"] + n * tiny + 1e-9 * r["l1"]
        checks = [("sum", r["sum"], c["sum"], slack), ("sum of |w|", r["l1"], c["l1"], slack),
                  ("sum of squares", r["sumsq"], c["sumsq"], (2 * u + u * u) * r["sumsq"] + 2 * tiny * r["l1"]
                   + n * tiny * tiny + 1e-9 * r["sumsq"])]
        checks += [(f"value {i}", a, b, u * abs(a) * 1.001 + tiny) for i, (a, b) in
                   enumerate(zip(r["sample"], c["sample"], strict=True))]
        for what, a, b, tol in checks:
            if not abs(a - b) <= tol:
                return f"{name}: {what} {b:.6g}, not {a:.6g}"
    return None


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
