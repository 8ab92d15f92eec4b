from __future__ import annotations

import os

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY = dict(
    vocab_size=100,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_config(arch: str, **extra) -> T.PretrainedConfig:
    if arch == "bert":
        return T.BertConfig(**TINY, **extra)
    if arch == "roberta":
        return T.RobertaConfig(**TINY, **extra)
    if arch == "xlm-roberta":
        return T.XLMRobertaConfig(**TINY, **extra)
    if arch == "electra":
        return T.ElectraConfig(embedding_size=8, **TINY, **extra)
    if arch == "distilbert":
        return T.DistilBertConfig(
            vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, **extra,
        )
    if arch == "deberta-v2":
        return T.DebertaV2Config(
            relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm",
            pos_att_type=["p2c", "c2p"], share_att_key=False, **TINY, **extra,
        )
    raise KeyError(arch)


ARCHS = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2"]


def tiny_model(arch: str = "bert", task: str = "seq", num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, num_labels=num_labels)
    cls = {
        "seq": T.AutoModelForSequenceClassification,
        "tok": T.AutoModelForTokenClassification,
        "qa": T.AutoModelForQuestionAnswering,
    }[task]
    return cls.from_config(cfg)


@pytest.fixture
def bert():
    return tiny_model("bert")


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-layer BERT with a WordPiece tokenizer over the fixtures' words, for runner tests."""
    import glob
    import json
    import re

    words: set[str] = set()
    for path in glob.glob(os.path.join(FIXTURES, "**", "*.jsonl"), recursive=True):
        for line in open(path):
            for v in json.loads(line).values():
                if isinstance(v, str):
                    words.update(re.findall(r"\w+|[^\w\s]", v.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    out = tmp_path_factory.mktemp("tiny-bert")
    tok = T.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = T.BertConfig(**{**TINY, "vocab_size": len(vocab), "max_position_embeddings": 512})
    T.BertForSequenceClassification(cfg).save_pretrained(out)
    return str(out)
