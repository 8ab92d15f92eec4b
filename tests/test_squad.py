from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES

from bitfit_tasks.tasks.metrics import exact_match, f1_score, normalize_answer, squad_metrics
from bitfit_tasks.tasks.squad.data import (
    prepare_eval_features,
    prepare_train_features,
    read_squad_file,
    sample_examples,
)
from bitfit_tasks.tasks.squad.qa import postprocess
from bitfit_tasks.tasks.squad.run import SquadArguments, main

SQ = f"{FIXTURES}/squad"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_official_and_flattened_formats_agree():
    official = read_squad_file(f"{SQ}/official.json")
    flat = read_squad_file(f"{SQ}/flat.jsonl")
    assert official == flat and len(official) == 5
    assert official[1]["answers"]["text"] == ["Cairo", "Cairo ,"]


def test_bad_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"version": "1.1"}))
    with pytest.raises(ValueError, match=r"not the official SQuAD format"):
        read_squad_file(str(bad))
    bad.write_text(json.dumps([{"id": "1", "question": "q"}]))
    with pytest.raises(ValueError, match=r"row 0 needs \['answers', 'context', 'id', 'question'\]; it has \['id', 'question'\]"):
        read_squad_file(str(bad))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        read_squad_file(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"--train_fraction must be in \(0, 1\]"):
        SquadArguments(train_fraction=1.5)
    with pytest.raises(ValueError, match=r"--doc_stride 400 must be smaller"):
        SquadArguments(doc_stride=400)


@pytest.mark.parametrize("max_len,stride", [(384, 128), (40, 16)])
def test_train_features_map_gold_answers_to_token_spans(tok, max_len, stride):
    rows = read_squad_file(f"{SQ}/official.json")
    feats = prepare_train_features(rows, tok, max_len, stride)
    enc = tok([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
              max_length=max_len, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    found = {}
    for i, (s, e) in enumerate(zip(feats["start_positions"], feats["end_positions"], strict=True)):
        row = rows[enc["overflow_to_sample_mapping"][i]]
        if s == 0 and e == 0:  # CLS: the answer is not inside this window
            continue
        off = enc["offset_mapping"][i]
        text = row["context"][off[s][0]:off[e][1]]
        assert normalize_answer(text) == normalize_answer(row["answers"]["text"][0])
        # Decoding the token span gives the answer back too.
        assert tok.decode(feats["input_ids"][i][s:e + 1]) == row["answers"]["text"][0].lower()
        found.setdefault(row["id"], []).append(i)
    assert set(found) == {r["id"] for r in rows}  # every answer lies in some window
    if max_len == 40:
        # 'traders' is at the very end of a long context: only a later window holds it.
        first_window_of_q3 = min(i for i, ex in enumerate(enc["overflow_to_sample_mapping"]) if ex == 2)
        assert min(found["q3"]) > first_window_of_q3


def test_postprocess_picks_best_span_across_windows(tok):
    rows = [read_squad_file(f"{SQ}/official.json")[2]]  # q3 'traders'
    enc, sample_map, offsets = prepare_eval_features(rows, tok, 40, 16)
    n_win = len(sample_map)
    assert n_win >= 2
    target = rows[0]["context"].index("traders")
    L = max(len(o) for o in offsets)
    start = np.full((n_win, L), -5.0)
    end = np.full((n_win, L), -5.0)
    # A tempting span in window 0 and the right one, scoring higher, in the last window that has it.
    ctx0 = [k for k, o in enumerate(offsets[0]) if o is not None]
    start[0, ctx0[0]], end[0, ctx0[1]] = 3.0, 3.0
    w = max(i for i in range(n_win) if any(o is not None and o[0] == target for o in offsets[i]))
    k = next(k for k, o in enumerate(offsets[w]) if o is not None and o[0] == target)
    start[w, k], end[w, k] = 4.0, 4.0
    # Question-token positions (offsets None) must never be chosen even with the highest logits.
    q_pos = next(k for k, o in enumerate(offsets[0]) if o is None and k > 0)
    start[0, q_pos], end[0, q_pos] = 50.0, 50.0
    preds = postprocess(rows, sample_map, offsets, start, end, n_best=20, max_answer_length=30)
    assert preds == {"q3": "traders"}


def test_official_em_f1_by_hand():
    assert normalize_answer("The  Mediterranean, Sea!") == "mediterranean sea"
    assert exact_match("the Cairo", "Cairo") == 1.0
    # pred tokens: [river, nile], gold: [nile, flows, north] -> common 1; P=1/2, R=1/3, F1=0.4
    assert f1_score("river Nile", "Nile flows north") == pytest.approx(0.4)
    m = squad_metrics({"a": "Cairo", "b": "river Nile", "c": "x"},
                      {"a": ["Cairo ,", "Kairo"], "b": ["Nile flows north", "the river"], "c": ["y"]})
    # a: EM 1 F1 1; b: EM 0, F1 max(0.4, 2*(1/2*1)/(1/2+1)=0.667); c: 0
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match=r"1 question\(s\) have no prediction"):
        squad_metrics({}, {"a": ["x"]})


def test_subset_sampling_is_seeded_example_level_not_prefix():
    rows = [{"id": str(i)} for i in range(1000)]
    a = sample_examples(rows, 0.1, None, seed=3)
    assert len(a) == 100 and a == sample_examples(rows, 0.1, None, seed=3)
    assert a != rows[:100] and a != sample_examples(rows, 0.1, None, seed=4)
    assert len(sample_examples(rows, 0.1, 20, seed=3)) == 20


def test_run_squad_smoke_same_subset_for_every_method(tiny_model_dir, tmp_path):
    ids = {}
    for mode in ("bitfit", "full"):
        out = tmp_path / mode
        res = main(["--train_file", f"{SQ}/official.json", "--validation_file", f"{SQ}/flat.jsonl",
                    "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--mode", mode,
                    "--train_fraction", "0.6", "--max_seq_length", "40", "--doc_stride", "16",
                    "--num_train_epochs", "1", "--use_cpu", "true", "--disable_tqdm", "true"])
        ids[mode] = json.loads((out / "train_ids.json").read_text())
        preds = json.loads((out / "predictions.json").read_text())
        assert set(preds) == {"q1", "q2", "q3", "q4", "q5"}
        assert res["history"][-1]["eval_n_examples"] == 5
        assert 0 <= res["best"] <= 100 and res["train_examples"] == 3
    assert ids["bitfit"] == ids["full"] and len(ids["bitfit"]) == 3


def test_training_size_curve_grid_resumes_and_plots(tiny_model_dir, tmp_path, capsys):
    from bitfit_tasks.experiments import sweep

    argv = ["--runner", "squad", "--fractions", "0.4", "1", "--methods", "bitfit", "full", "--seeds", "1", "2",
            "--bias_lrs", "1e-3", "--full_lrs", "5e-5", "--output_dir", str(tmp_path), "--",
            "--train_file", f"{SQ}/official.json", "--validation_file", f"{SQ}/official.json",
            "--model_name_or_path", tiny_model_dir, "--max_seq_length", "40", "--doc_stride", "16",
            "--num_train_epochs", "1", "--use_cpu", "true", "--disable_tqdm", "true"]
    sweep.main(argv)
    out = capsys.readouterr().out
    assert "| bitfit | 0.4 |" in out and "| full | 1 |" in out
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    runs = sorted(tmp_path.glob("frac*/*/lr*/seed*/results.json"))
    assert len(runs) == 8
    assert json.loads((tmp_path / "frac0.4/bitfit/lr0.001/seed1/results.json").read_text())["train_examples"] == 2
    stamps = [p.stat().st_mtime_ns for p in runs]
    sweep.main(argv)
    assert [p.stat().st_mtime_ns for p in runs] == stamps


def test_fraction_epochs_give_each_fraction_its_own_epochs():
    from bitfit_tasks.experiments.sweep import fraction_task_args

    tasks, args = fraction_task_args([0.01, 0.1], [10, 3])
    assert tasks == ["frac0.01", "frac0.1"]
    assert args("frac0.01") == ["--train_fraction", "0.01", "--num_train_epochs", "10"]
    assert args("frac0.1") == ["--train_fraction", "0.1", "--num_train_epochs", "3"]
    assert fraction_task_args([0.5])[1]("frac0.5") == ["--train_fraction", "0.5"]
    with pytest.raises(ValueError, match=r"one value per fraction: got 1 for 2 fractions"):
        fraction_task_args([0.01, 0.1], [10])
    with pytest.raises(ValueError, match=r"--fraction_epochs and --num_train_epochs both set"):
        fraction_task_args([0.01], [10], ["--num_train_epochs", "2"])
    with pytest.raises(ValueError, match=r"--fraction_epochs and --num_train_epochs both set"):
        fraction_task_args([0.01], [10], ["--num_train_epochs=2"])


def reference_postprocess(rows, sample_map, offsets, start_logits, end_logits, n_best=20, max_answer_length=30):
    """The loop post-processing this package used before the vectorised one: the oracle."""
    import collections

    by_example = collections.defaultdict(list)
    for f, ex in enumerate(sample_map):
        by_example[ex].append(f)
    preds = {}
    for ex, row in enumerate(rows):
        best_score, best_text = -np.inf, ""
        for f in by_example.get(ex, []):
            sl, el, off = start_logits[f], end_logits[f], offsets[f]
            n = len(off)
            for s in np.argsort(sl[:n])[::-1][:n_best]:
                for e in np.argsort(el[:n])[::-1][:n_best]:
                    if off[s] is None or off[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = sl[s] + el[e]
                    if score > best_score:
                        best_score, best_text = score, row["context"][off[s][0]:off[e][1]]
        preds[row["id"]] = best_text
    return preds


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_postprocess_equals_the_loop(tok, seed):
    rows = read_squad_file(f"{SQ}/official.json")
    enc, sample_map, offsets = prepare_eval_features(rows, tok, 40, 16)
    rng = np.random.default_rng(seed)
    shape = (len(sample_map), max(len(o) for o in offsets))
    # Coarse logits (ties everywhere) and a short max answer length exercise the tie-breaking and limits.
    start = rng.integers(-3, 3, shape).astype(np.float32)
    end = rng.integers(-3, 3, shape).astype(np.float32)
    for n_best, max_len in ((20, 30), (3, 2), (1, 1)):
        want = reference_postprocess(rows, sample_map, offsets, start, end, n_best, max_len)
        assert postprocess(rows, sample_map, offsets, start, end, n_best, max_len) == want


def test_cached_and_uncached_windows_are_identical(tok, tmp_path):
    from bitfit_tasks.tasks.squad.data import window_dataset
    from bitfit_tasks.tasks.squad.qa import offsets_array

    rows = read_squad_file(f"{SQ}/official.json")
    want_train = prepare_train_features(rows, tok, 40, 16)
    want_eval, sample_map, offsets = prepare_eval_features(rows, tok, 40, 16)
    for attempt in ("cold", "warm"):
        train = window_dataset("train", rows, tok, 40, 16, cache_dir=str(tmp_path))
        ev = window_dataset("eval", rows, tok, 40, 16, cache_dir=str(tmp_path))
        for k, v in want_train.items():
            assert train[k] == v, (attempt, k)
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            assert ev[k] == want_eval[k], (attempt, k)
        assert ev["example_index"] == list(sample_map)
        assert np.array_equal(ev.with_format("numpy")[:]["offset_mapping"], offsets_array(offsets))
    files = sorted(p.name for p in (tmp_path / "bitfit_tasks" / "squad").glob("*.arrow"))
    assert len(files) == 2 and files[0].startswith("eval-") and files[1].startswith("train-")
    # Other settings or other questions: another cache file, never a stale one.
    window_dataset("train", rows[:3], tok, 40, 16, cache_dir=str(tmp_path))
    window_dataset("train", rows, tok, 48, 16, cache_dir=str(tmp_path))
    assert len(list((tmp_path / "bitfit_tasks" / "squad").glob("train-*.arrow"))) == 3
