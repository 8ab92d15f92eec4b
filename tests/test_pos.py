from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from conftest import FIXTURES

from bitfit_tasks.tasks.pos.data import (
    parse_ptb_trees,
    read_conll_columns,
    read_conllu,
    read_file,
    read_treebank_splits,
    wsj_section,
)
from bitfit_tasks.tasks.pos.run import PosArguments, check_tags, main
from bitfit_tasks.tasks.pos.tagging import IGNORE, align_labels, word_accuracy_metrics

POS = f"{FIXTURES}/pos"


def test_ptb_tree_with_traces():
    sents = read_file(f"{POS}/treebank/wsj_0001.mrg")
    assert sents[0] == {"tokens": ["The", "board", "agreed", "to", "meet", "Monday", "."],
                        "tags": ["DT", "NN", "VBD", "TO", "VB", "NNP", "."]}  # (-NONE- *-1) dropped
    assert sents[1]["tokens"] == ["It", "is", "good", "."]
    only_traces = read_file(f"{POS}/treebank/wsj_0160.mrg")
    assert only_traces == [{"tokens": ["Prices", "rose", "5", "%", "."], "tags": ["NNS", "VBD", "CD", "NN", "."]}]
    with pytest.raises(ValueError, match=r"unbalanced '\)'"):
        parse_ptb_trees("(S (NN a)))", "bad.mrg")
    with pytest.raises(ValueError, match=r"1 unclosed '\('"):
        parse_ptb_trees("( (S (NN a) )", "bad.mrg")


def test_treebank_file_split_for_nltk_sample_and_zip(tmp_path):
    splits = read_treebank_splits(f"{POS}/treebank")
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [2, 1, 2]
    z = tmp_path / "treebank.zip"
    with zipfile.ZipFile(z, "w") as f:
        for n in ("wsj_0001", "wsj_0160", "wsj_0180"):
            f.write(f"{POS}/treebank/{n}.mrg", f"treebank/combined/{n}.mrg")
    assert read_treebank_splits(z) == splits
    assert wsj_section("wsj_2201.mrg") == 22 and wsj_section("x.mrg") is None


def test_standard_section_split(tmp_path):
    tree = (tmp_path / "src.mrg")
    tree.write_text("( (S (NN a) (. .) ))\n")
    for name in ("00/wsj_0001", "18/wsj_1899", "19/wsj_1900", "21/wsj_2100", "22/wsj_2200", "24/wsj_2454"):
        (tmp_path / "wsj" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "wsj" / f"{name}.mrg").write_text(tree.read_text())
    splits = read_treebank_splits(tmp_path / "wsj")
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [2, 2, 2]


def test_conll_columns_and_zip_member(tmp_path):
    sents = read_file(f"{POS}/conll2000.txt")
    assert sents == [{"tokens": ["Confidence", "in", "the", "pound", "."], "tags": ["NN", "IN", "DT", "NN", "."]},
                     {"tokens": ["Rates", "rose", "."], "tags": ["NNS", "VBD", "."]}]
    z = tmp_path / "conll2000.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(f"{POS}/conll2000.txt", "conll2000/train.txt")
    assert read_file(f"{z}::conll2000/train.txt") == sents
    with pytest.raises(ValueError, match=r"name one member of the zip"):
        read_file(str(z), "conll")
    with pytest.raises(ValueError, match=r"needs? 3"):
        read_conll_columns(["a NN", "b"], 0, 2, source="x")


def test_conllu_multiword_token_and_empty_node():
    sents = read_file(f"{POS}/ewt.conllu")
    assert sents[0] == {"tokens": ["I", "do", "n't", "know", "."], "tags": ["PRP", "VBP", "RB", "VB", "."]}
    assert sents[1]["tags"] == ["NNS", "VBD"]
    upos = read_conllu(open(f"{POS}/ewt.conllu"), "upos")
    assert upos[0]["tags"] == ["PRON", "AUX", "PART", "VERB", "PUNCT"]
    with pytest.raises(ValueError, match=r"no XPOS tag \('_'\).*--conllu_tag_field upos"):
        read_conllu(["1\ta\ta\tNOUN\t_\t_\t0\troot\t_\t_"], source="x")
    with pytest.raises(ValueError, match=r"10 tab-separated fields"):
        read_conllu(["1 a NOUN"], source="x")


def test_token_tag_dataset_file():
    assert read_file(f"{POS}/tagged.jsonl")[1] == {"tokens": ["Prices", "rose"], "tags": ["NNS", "VBD"]}


def test_subtoken_alignment_labels_first_piece_only():
    # "unaffordable" -> 3 pieces (word 1), specials None
    word_ids = [None, 0, 1, 1, 1, 2, None]
    assert align_labels(word_ids, [5, 7, 9]) == [IGNORE, 5, 7, IGNORE, IGNORE, 9, IGNORE]


def test_alignment_with_a_real_fast_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = ["the", "cat", "zzzq"]
    enc = tok(words, is_split_into_words=True)
    labels = align_labels(enc.word_ids(), [1, 2, 3])
    firsts = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert [enc.word_ids()[i] for i in firsts] == [0, 1, 2]
    assert [labels[i] for i in firsts] == [1, 2, 3]


def test_word_accuracy_metrics_by_hand():
    id2tag = {0: "DT", 1: "NN", 2: "VB"}
    labels = np.array([[IGNORE, 0, 1, IGNORE, 2, IGNORE], [IGNORE, 1, 1, IGNORE, IGNORE, IGNORE]])
    preds = np.array([[2, 0, 2, 2, 2, 0], [0, 1, 0, 1, 1, 1]])
    m = word_accuracy_metrics(preds, labels, id2tag)
    # words: (DT,DT) (NN,VB) (VB,VB) (NN,NN) (NN,DT) -> 3 of 5
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n_words"] == 5
    assert m["per_tag"]["NN"] == {"precision": 1.0, "recall": pytest.approx(1 / 3), "support": 3}
    assert m["per_tag"]["VB"]["precision"] == pytest.approx(1 / 2)
    assert set(m["confusions"]) == {"NN->VB: 1", "NN->DT: 1"}
    assert word_accuracy_metrics(preds, labels, id2tag, extra_wrong=1)["accuracy"] == pytest.approx(3 / 6)


def test_unknown_tags_policy():
    sents = [{"tokens": ["a", "b"], "tags": ["NN", "XX"]}]
    with pytest.raises(ValueError, match=r"validation data has tags the training data never shows: \{'XX': 1\}"):
        check_tags("validation", sents, {"NN"}, "error")
    assert check_tags("validation", sents, {"NN"}, "count_wrong") == 1


def test_argument_errors():
    with pytest.raises(ValueError, match=r"exactly one data source"):
        PosArguments()
    with pytest.raises(ValueError, match=r"--train_file needs --validation_file"):
        PosArguments(train_file="a.txt")
    with pytest.raises(ValueError, match=r"cannot tell the format"):
        read_file("data.xyz")


@pytest.mark.parametrize("mode", ["bitfit", "full", "frozen", "rand_uniform"])
def test_run_pos_smoke(mode, tiny_model_dir, tmp_path):
    res = main(["--treebank", f"{POS}/treebank", "--model_name_or_path", tiny_model_dir, "--output_dir",
                str(tmp_path), "--num_train_epochs", "2", "--use_cpu", "true", "--mode", mode,
                "--ignore_mismatched_sizes", "true", "--disable_tqdm", "true", "--unknown_tags", "count_wrong"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metric"] == "word accuracy" and saved["mode"] == mode
    assert saved["history"][-1]["eval_n_words"] == 5  # wsj_0160: 5 words (traces dropped)
    assert 0 <= saved["best"] <= 1 and 0 <= res["test_accuracy"] <= 1  # the treebank has a test split


def test_run_pos_conllu_with_test_file(tiny_model_dir, tmp_path):
    res = main(["--train_file", f"{POS}/ewt.conllu", "--validation_file", f"{POS}/ewt.conllu", "--test_file",
                f"{POS}/ewt.conllu", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
                "--num_train_epochs", "1", "--use_cpu", "true", "--ignore_mismatched_sizes", "true"])
    assert "test_accuracy" in res
    assert json.loads((tmp_path / "results.json").read_text())["n_tags"] == 7


def test_token_loss_is_global_token_mean():
    import torch

    from bitfit_tasks.tasks.pos.tagging import token_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=g)
    labels = torch.randint(0, 5, (4, 6), generator=g)
    labels[0, :4] = IGNORE
    mean = torch.nn.functional.cross_entropy(logits.view(-1, 5), labels.view(-1), ignore_index=IGNORE)
    assert torch.allclose(token_loss({"logits": logits}, labels), mean)
    # Two halves normalised by the global count sum to the global mean (what DDP + Trainer compute).
    n = (labels != IGNORE).sum()
    halves = sum(token_loss({"logits": logits[i:i + 2]}, labels[i:i + 2], num_items_in_batch=n) for i in (0, 2))
    assert torch.allclose(halves, mean)


def test_pos_eval_subset_is_fixed_across_seeds(tiny_model_dir, tmp_path):
    words = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        main(["--train_file", f"{POS}/ewt.conllu", "--validation_file", f"{POS}/ewt.conllu", "--model_name_or_path",
              tiny_model_dir, "--output_dir", str(out), "--num_train_epochs", "1", "--use_cpu", "true",
              "--ignore_mismatched_sizes", "true", "--seed", seed, "--max_eval_samples", "2", "--disable_tqdm", "true"])
        words.append([json.loads(x)["tokens"] for x in (out / "predictions_validation.jsonl").read_text().splitlines()])
    assert len(words[0]) == 2 and words[0] == words[1]


def test_pos_features_cached_equal_uncached(tiny_model_dir, tmp_path, monkeypatch):
    import datasets.config
    from transformers import AutoTokenizer

    from bitfit_tasks.tasks.pos.data import read_conllu
    from bitfit_tasks.tasks.pos.tagging import IGNORE, align_labels, encode_sentences

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sents = read_conllu(open(f"{POS}/ewt.conllu").read().splitlines())
    tag2id = {t: i for i, t in enumerate(sorted({t for s in sents for t in s["tags"]}))}
    cold = encode_sentences(sents, tok, tag2id, 8)  # short: some words are cut off
    warm = encode_sentences(sents, tok, tag2id, 8)
    assert len(list((tmp_path / "bitfit_tasks" / "pos").glob("*.arrow"))) == 1
    enc = tok([s["tokens"] for s in sents], is_split_into_words=True, truncation=True, max_length=8)
    for ds in (cold, warm):
        assert ds["input_ids"] == enc["input_ids"]
        assert ds["labels"] == [align_labels(enc.word_ids(i), [tag2id.get(t, IGNORE) for t in s["tags"]])
                                for i, s in enumerate(sents)]
        assert sum(ds["n_lost"]) == sum(len(s["tokens"]) - len({w for w in enc.word_ids(i) if w is not None})
                                        for i, s in enumerate(sents)) > 0
