"""BitFit on the families with biases beyond BERT's: MPNet, ALBERT, GPT-2, OPT, BLOOM, Qwen2, GPT-NeoX.
Per-term counts are written out by hand from each module tree (hidden 16, intermediate 32 or 4x16,
2 layers; ALBERT shares one layer group)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import FAMILIES, tiny_config
from test_trainer import RandomPairs, snapshot

from bitfit_tasks import BitFitConfig, BitFitTrainer, apply_delta
from bitfit_tasks.core.selection import head_parameter_names, select_bias_parameters

H = 16
# term -> number of bias values (all layers) for the 'bitfit' preset.
COUNTS = {
    "mpnet": {"q": 2 * H, "k": 2 * H, "v": 2 * H, "m1": 2 * H, "LN1": 2 * H, "m2": 2 * 32, "m3": 2 * H,
              "LN2": 2 * H, "emb": H},
    "albert": {"q": H, "k": H, "v": H, "m1": H, "LN1": H, "m2": 32, "m3": H, "LN2": H, "emb": 8 + H, "pool": H},
    "gpt2": {"qkv": 2 * 3 * H, "m1": 2 * H, "LN1": 2 * H, "m2": 2 * 4 * H, "m3": 2 * H, "LN2": 2 * H, "final": H},
    "opt": {"q": 2 * H, "k": 2 * H, "v": 2 * H, "m1": 2 * H, "LN1": 2 * H, "m2": 2 * 32, "m3": 2 * H,
            "LN2": 2 * H, "final": H},
    "bloom": {"qkv": 2 * 3 * H, "m1": 2 * H, "LN1": 2 * H, "m2": 2 * 4 * H, "m3": 2 * H, "LN2": 2 * H,
              "emb": H, "final": H},
    "qwen2": {"q": 2 * H, "k": 2 * H, "v": 2 * H},
    "gpt_neox": {"qkv": 2 * 3 * H, "m1": 2 * H, "LN1": 2 * H, "m2": 2 * 32, "m3": 2 * H, "LN2": 2 * H, "final": H},
}
HAS_TOKEN_CLS = {"mpnet", "albert", "gpt2", "bloom", "qwen2", "gpt_neox"}  # OPT has no token-classification class


def make(arch: str, task: str = "seq", seed: int = 0):
    torch.manual_seed(seed)
    cls = T.AutoModelForSequenceClassification if task == "seq" else T.AutoModelForTokenClassification
    return cls.from_config(tiny_config(arch, num_labels=2))


@pytest.mark.parametrize("arch", FAMILIES)
def test_per_term_counts_and_every_bias_covered(arch):
    model = make(arch)
    params = dict(model.named_parameters())
    got = select_bias_parameters(model, "bitfit")
    assert {t: sum(params[n].numel() for n in ns) for t, ns in got.items()} == COUNTS[arch]
    backbone = {id(p) for p in model.base_model.parameters()}
    want = {n for n, p in model.named_parameters() if n.endswith(".bias") and id(p) in backbone}
    assert {n for ns in got.values() for n in ns} == want


def test_fused_qkv_is_one_term():
    model = make("gpt2")
    with pytest.raises(ValueError, match=r"bias term 'q' matches no parameter of GPT2ForSequenceClassification.*"
                                         r"the terms this model has are \['m1', 'LN1', 'm2', 'm3', 'LN2', 'qkv', "
                                         r"'final'\]"):
        select_bias_parameters(model, ["q"])
    assert list(select_bias_parameters(model, ["qkv", "m2"])) == ["qkv", "m2"]


def test_named_preset_losing_a_term_warns(caplog):
    with caplog.at_level("WARNING", logger="bitfit_tasks"):
        got = select_bias_parameters(make("gpt2"), "qm2")
    assert list(got) == ["m2"]
    assert "GPT2ForSequenceClassification has no ['q'] bias term(s), skipped; fused q/k/v" in caplog.text


@pytest.mark.parametrize("arch, task", [(a, "seq") for a in FAMILIES] + [(a, "tok") for a in FAMILIES
                                                                         if a in HAS_TOKEN_CLS])
def test_end_to_end_only_biases_and_head_change_and_delta_round_trip(arch, task, tmp_path):
    model = make(arch, task)
    before = snapshot(model)
    selected = {n for ns in select_bias_parameters(model, "bitfit").values() for n in ns}
    head = set(head_parameter_names(model))
    data = RandomPairs(n=16, seq=10)
    if task == "tok":
        data.labels = torch.randint(0, 2, (16, 10), generator=torch.Generator().manual_seed(1))
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                               learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                               use_cpu=True, seed=0)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=data, bitfit_config=BitFitConfig())
    trainer.train()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == selected | head, sorted(changed ^ (selected | head))
    # Delta round trip: a fresh base + the saved delta computes what the trained model computes.
    trainer.save_model(str(tmp_path / "delta"))
    fresh = make(arch, task)
    apply_delta(fresh, str(tmp_path / "delta"))
    batch = {"input_ids": data.ids[:4], "attention_mask": torch.ones_like(data.ids[:4])}
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, fresh(**batch).logits, atol=1e-6)


def test_runners_with_a_decoder_backbone(tiny_gpt2_dir, tmp_path):
    """run_glue (sequence classification) and run_pos (token classification) on a local GPT-2 folder
    whose tokenizer has no pad token: padding uses eos, only biases + head train."""
    import json
    import os

    from conftest import FIXTURES
    from safetensors.torch import load_file

    from bitfit_tasks.tasks.glue.run import main as glue_main
    from bitfit_tasks.tasks.pos.run import main as pos_main

    res = glue_main(["--task_name", "mrpc", "--data_dir", os.path.join(FIXTURES, "glue"), "--model_name_or_path",
                     tiny_gpt2_dir, "--output_dir", str(tmp_path / "glue"), "--num_train_epochs", "1",
                     "--use_cpu", "true", "--disable_tqdm", "true", "--per_device_train_batch_size", "4"])
    model = T.GPT2ForSequenceClassification.from_pretrained(tiny_gpt2_dir)
    biases = sum(p.numel() for n, p in model.transformer.named_parameters() if n.endswith(".bias"))
    assert res["trainable_params"] == biases + model.score.weight.numel()
    assert res["final_metrics"]["eval_n_examples"] > 0
    delta = load_file(str(tmp_path / "glue" / "bitfit_delta.safetensors"))
    assert "score.weight" in delta and "transformer.h.0.attn.c_attn.bias" in delta
    pos = pos_main(["--treebank", os.path.join(FIXTURES, "pos", "treebank"), "--model_name_or_path", tiny_gpt2_dir,
                    "--output_dir", str(tmp_path / "pos"), "--num_train_epochs", "1", "--use_cpu", "true",
                    "--disable_tqdm", "true", "--unknown_tags", "count_wrong"])
    assert pos["bias_terms"] == ["bitfit"]
    assert pos["trainable_params"] == biases + (16 + 1) * pos["n_tags"]  # + the token head's weight and bias
    saved = json.loads((tmp_path / "pos" / "results.json").read_text())
    assert saved["history"][-1]["eval_n_words"] == 5 and 0 <= saved["best"] <= 1
