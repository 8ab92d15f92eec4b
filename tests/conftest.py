from __future__ import annotations

import os
import subprocess
import sys

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
    # Families with biases beyond BERT's (issue: drop-in for every architecture that has biases).
    small = dict(vocab_size=100, max_position_embeddings=64)
    if arch == "mpnet":
        return T.MPNetConfig(**TINY, **extra)
    if arch == "albert":
        return T.AlbertConfig(embedding_size=8, **TINY, **extra)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                            eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            **extra)
    if arch == "opt":
        return T.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                           word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1, dropout=0.0,
                           **small, **extra)
    if arch == "bloom":
        return T.BloomConfig(vocab_size=100, hidden_size=16, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1,
                             eos_token_id=1, **extra)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=1, **small, **extra)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                               pad_token_id=0, bos_token_id=1, eos_token_id=1, **small, **extra)
    raise KeyError(arch)


FAMILIES = ["mpnet", "albert", "gpt2", "opt", "bloom", "qwen2", "gpt_neox"]
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


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A saved 2-layer GPT-2 (a decoder backbone) with a byte-level BPE tokenizer trained on the
    fixtures' text and, like the real GPT-2's, no pad token."""
    import glob
    import json

    from tokenizers import ByteLevelBPETokenizer

    texts: list[str] = []
    for path in glob.glob(os.path.join(FIXTURES, "**", "*.jsonl"), recursive=True):
        for line in open(path):
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    for path in glob.glob(os.path.join(FIXTURES, "pos", "**", "*.mrg"), recursive=True):
        texts.append(open(path).read())
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = T.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                              eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tiny-gpt2")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=512,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    T.GPT2ForSequenceClassification(cfg).save_pretrained(out)
    return str(out)


def _fixture_texts() -> list[str]:
    import glob
    import json

    texts: list[str] = []
    for path in glob.glob(os.path.join(FIXTURES, "**", "*.jsonl"), recursive=True):
        for line in open(path):
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    for path in glob.glob(os.path.join(FIXTURES, "**", "*.json"), recursive=True):
        texts.append(open(path).read())
    for path in glob.glob(os.path.join(FIXTURES, "pos", "**", "*.mrg"), recursive=True):
        texts.append(open(path).read())
    return texts


# Families built without biases (BitFit adds them): tiny configs, hidden 16, 2 layers, GQA where the family has it.
BIAS_FREE = ["modernbert", "llama", "mistral", "qwen3", "gemma3_text", "phi3"]


def bias_free_config(arch: str, vocab_size: int = 100, **extra) -> T.PretrainedConfig:
    small = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=512, pad_token_id=0)
    gqa = dict(small, num_key_value_heads=1)
    if arch == "modernbert":
        return T.ModernBertConfig(**{**small, "global_attn_every_n_layers": 2, "local_attention": 16, "bos_token_id": 1,
                                     "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2, **extra})
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen3": T.Qwen3Config,
           "gemma3_text": T.Gemma3TextConfig, "phi3": T.Phi3Config}[arch]
    head_dim = {"head_dim": 8} if arch in ("qwen3", "gemma3_text") else {}
    return cls(**{**gqa, **head_dim, **extra})


@pytest.fixture(scope="session")
def tiny_bias_free_dirs(tmp_path_factory):
    """Saved 2-layer ModernBERT and Llama folders (no biases anywhere in their backbones) with byte-level BPE
    tokenizers trained on the fixtures' text; the Llama tokenizer, like the real one, has no pad token."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_fixture_texts(), vocab_size=500, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"])
    out = {}
    for arch in ("modernbert", "llama"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        if arch == "modernbert":
            tok = T.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", cls_token="<s>",
                                            sep_token="</s>", unk_token="<unk>", mask_token="<mask>")
        else:
            tok = T.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>")
        tok.save_pretrained(folder)
        torch.manual_seed(0)
        cfg = bias_free_config(arch, vocab_size=len(tok), pad_token_id=0 if arch == "modernbert" else None)
        T.AutoModel.from_config(cfg).save_pretrained(folder)  # a backbone, as pretrained models come
        out[arch] = str(folder)
    return out


def run_concurrently(commands: list[list[str]], cwd, timeout: int = 600) -> list[tuple[str, str]]:
    """Run Python commands (``[script, *args]``) at once, offline, one torch thread each, and assert each exits 0;
    returns each one's (stdout, stderr). Independent runner runs overlap their imports and start-up, which
    dominate at test sizes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in commands]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for cmd, p, (_, err) in zip(commands, procs, outs, strict=True):
        assert p.returncode == 0, f"{' '.join(cmd[:2])}: {err[-3000:]}"
    return outs
