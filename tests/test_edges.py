"""The edges of the newest features, each through the public API: PEFT adapters of any head read back from their
own files, a refused construction that changes nothing, stacked deltas removed in any order, full-mode resume of a
PEFT model, a family without the task's head class, and resume past a damaged newest checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import FIXTURES, bias_free_config, run_concurrently, tiny_model
from test_added_biases import RandomTokens

from bitfit_tasks import BitFitConfig, BitFitTrainer, MultiTaskBitFit, apply_delta, load_task_model
from bitfit_tasks.utils.errors import UsageError

peft = pytest.importorskip("peft")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bpe_tokenizer():
    import glob

    from tokenizers import ByteLevelBPETokenizer

    texts = []
    for path in glob.glob(os.path.join(FIXTURES, "glue", "**", "*.jsonl"), recursive=True):
        texts += [v for line in open(path) for v in json.loads(line).values() if isinstance(v, str)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return bpe


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A saved 2-layer RoBERTa backbone (its classification head is dense + out_proj) with a BPE tokenizer."""
    out = tmp_path_factory.mktemp("tiny-roberta")
    tok = T.PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer()._tokenizer, bos_token="<s>", eos_token="</s>",
                                    cls_token="<s>", sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                    mask_token="<mask>")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = T.RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=80, pad_token_id=tok.pad_token_id)
    T.RobertaModel(cfg).save_pretrained(out)
    return str(out)


def run_glue(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_glue.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def glue_run(model_dir, task, out, *extra):
    return ["--task_name", task, "--data_dir", os.path.join(FIXTURES, "glue"), "--model_name_or_path", model_dir,
            "--output_dir", str(out), "--max_seq_length", "32", "--use_cpu", "true", "--disable_tqdm", "true",
            "--train_eval_samples", "0", "--num_train_epochs", "1", "--recipe", "linear",
            "--learning_rate", "1e-2", *extra]


def peft_logits(base, adapter, ids, **kw):
    config = T.AutoConfig.from_pretrained(str(adapter))
    model = T.AutoModelForSequenceClassification.from_pretrained(base, config=config)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, str(adapter)).eval()(input_ids=ids, **kw).logits


def test_beft_adapters_of_a_roberta_head_with_3_and_1_labels_serve_beside_a_bitfit_delta(roberta_dir, tmp_path):
    """Real --mode beft runs: MNLI (3 labels) and STS-B (1 label) on RoBERTa, whose head is dense + out_proj. Both
    adapters are read from their own files and served in one mixed batch beside a BitFit delta, each row with the
    logits of its own model (PEFT's forward for the adapters). Before: a size mismatch for out_proj."""
    mnli, stsb, bitfit = tmp_path / "mnli", tmp_path / "stsb", tmp_path / "bitfit"
    script = os.path.join(REPO, "run_glue.py")
    run_concurrently([[script, *glue_run(roberta_dir, "mnli", mnli, "--mode", "beft")],
                      [script, *glue_run(roberta_dir, "stsb", stsb, "--mode", "beft")],
                      [script, *glue_run(roberta_dir, "rte", bitfit)]], tmp_path)
    assert json.loads((mnli / "config.json").read_text())["id2label"]["2"] == "contradiction"
    ids = torch.randint(5, 300, (4, 9), generator=torch.Generator().manual_seed(0))
    served = MultiTaskBitFit(T.AutoModel.from_pretrained(roberta_dir))
    served.add_task("mnli", str(mnli))
    served.add_task("stsb", str(stsb))
    served.add_task("rte", str(bitfit))
    rows = served.forward_mixed(["mnli", "stsb", "rte", "mnli"], input_ids=ids)
    want_mnli, want_stsb = peft_logits(roberta_dir, mnli, ids), peft_logits(roberta_dir, stsb, ids)
    with torch.no_grad():
        want_rte = load_task_model(roberta_dir, str(bitfit)).eval()(input_ids=ids).logits
    assert rows[0]["logits"].shape == (3,) and rows[1]["logits"].shape == (1,)
    for i, want in ((0, want_mnli), (1, want_stsb), (2, want_rte), (3, want_mnli)):
        assert torch.allclose(rows[i]["logits"], want[i], atol=1e-5), i
    assert served.tasks["mnli"].config.id2label[2] == "contradiction"


def test_a_padless_llama_adapter_keeps_its_pad_token_and_labels(tmp_path):
    """A Llama shipped without a pad token, trained (as the runners do) padding with eos: the adapter's config.json
    carries the pad token and the labels, and a padded batch of 3 serves with PEFT's logits."""
    from transformers import TrainingArguments

    cfg = bias_free_config("llama", pad_token_id=None)
    torch.manual_seed(0)
    T.AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    task_cfg = bias_free_config("llama", pad_token_id=2, num_labels=3, id2label={0: "neg", 1: "mid", 2: "pos"},
                                label2id=None)
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", config=task_cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=1e-2, num_train_epochs=1,
                             per_device_train_batch_size=8, report_to="none", disable_tqdm=True, save_strategy="no",
                             use_cpu=True)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomTokens(num_labels=3),
                            bitfit_config=BitFitConfig(mode="beft", peft_targets=["q", "v"]))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8], [5, 9, 2, 2], [7, 2, 2, 2]])
    served = MultiTaskBitFit(T.AutoModel.from_pretrained(tmp_path / "base"))
    served.add_task("sent", str(tmp_path / "adapter"))
    rows = served.forward_mixed(["sent"] * 3, input_ids=ids, attention_mask=(ids != 2).long())
    want = peft_logits(str(tmp_path / "base"), tmp_path / "adapter", ids, attention_mask=(ids != 2).long())
    assert torch.allclose(torch.stack([r["logits"] for r in rows]), want, atol=1e-5)
    assert served.tasks["sent"].config.id2label == {0: "neg", 1: "mid", 2: "pos"}
    assert served.tasks["sent"].config.pad_token_id == 2


def test_reading_an_adapter_loads_no_second_base(roberta_dir, tmp_path):
    """MultiTaskBitFit holds the backbone: reading an adapter takes its base values from there, never from a
    second copy of the base (the recorded base path is gone here, so a load would fail)."""
    base = tmp_path / "base"
    shutil.copytree(roberta_dir, base)
    run_glue(glue_run(str(base), "mnli", tmp_path / "mnli", "--mode", "beft"), tmp_path)
    ids = torch.randint(5, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    want = peft_logits(str(base), tmp_path / "mnli", ids)
    served = MultiTaskBitFit(T.AutoModel.from_pretrained(str(base)))
    shutil.rmtree(base)
    served.add_task("mnli", str(tmp_path / "mnli"))
    rows = served.forward_mixed(["mnli"] * 3, input_ids=ids)
    assert torch.allclose(torch.stack([r["logits"] for r in rows]), want, atol=1e-5)


def test_a_peft_saved_adapter_without_config_json_reads_on_a_moved_base(tmp_path, caplog):
    """An adapter saved by PEFT itself has no config.json: its head size comes from its saved head and the config
    from the backbone MultiTaskBitFit holds, so a base moved away since is no problem; a backbone loaded from
    another path than the adapter names gets a warning (an adapter holds no fingerprint of its base)."""
    import logging

    cfg = T.RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=40, num_labels=3)
    torch.manual_seed(0)
    T.RobertaModel(cfg).save_pretrained(tmp_path / "base")
    model = T.RobertaForSequenceClassification.from_pretrained(tmp_path / "base", config=cfg)
    pm = peft.get_peft_model(model, peft.BeftConfig(task_type="SEQ_CLS", target_modules=["value"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "beft_bias" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
    shutil.move(str(tmp_path / "base"), str(tmp_path / "moved"))
    served = MultiTaskBitFit(T.AutoModel.from_pretrained(str(tmp_path / "moved")))
    with caplog.at_level(logging.WARNING, logger="bitfit_tasks"):
        served.add_task("mnli", str(tmp_path / "adapter"))
    assert "holds no fingerprint of its base" in caplog.text
    rows = served.forward_mixed(["mnli", "mnli"], input_ids=ids)
    assert torch.allclose(torch.stack([r["logits"] for r in rows]), want, atol=1e-5)
    from bitfit_tasks.peft_interop.convert import delta_from_peft

    with pytest.raises(UsageError, match=r"adapter: its base '.*base' could not be loaded \(.*\); pass base_model="):
        delta_from_peft(tmp_path / "adapter")


@pytest.mark.parametrize("mode", ["lora", "beft"])
def test_a_refused_peft_trainer_leaves_the_model_as_it_was(mode, tmp_path):
    """Trainer refuses eval_strategy='epoch' without an eval set after PEFT would have wrapped the model: the
    caller's model keeps its modules, values and requires_grad, and the corrected retry trains."""
    from transformers import TrainingArguments

    model = tiny_model("bert")
    before_types = [type(m) for m in model.modules()]
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    bad = TrainingArguments(output_dir=str(tmp_path / "a"), eval_strategy="epoch", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="you didn.t pass an `eval_dataset`"):
        BitFitTrainer(model=model, args=bad, train_dataset=RandomTokens(num_labels=2),
                      bitfit_config=BitFitConfig(mode=mode))
    assert [type(m) for m in model.modules()] == before_types
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n, (value, grad) in before.items():
        assert torch.equal(after[n], value) and after[n].requires_grad == grad, n
    assert not hasattr(model, "peft_config")
    good = TrainingArguments(output_dir=str(tmp_path / "b"), report_to="none", use_cpu=True, max_steps=1,
                             disable_tqdm=True, save_strategy="no")
    BitFitTrainer(model=model, args=good, train_dataset=RandomTokens(num_labels=2), bitfit_config=BitFitConfig(mode=mode)).train()


@pytest.mark.parametrize("order", ["first-applied first", "last-applied first"])
def test_stacked_deltas_removed_in_either_order_give_the_base_back(order, tmp_path):
    """The same delta applied twice, then both handles removed: the base comes back bit for bit in either order,
    also where the delta added biases (Llama); after one removal the other application is still in place."""
    from transformers import TrainingArguments

    cfg = bias_free_config("llama", num_labels=2)
    torch.manual_seed(0)
    T.AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", config=cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=1e-2, max_steps=3,
                             per_device_train_batch_size=8, report_to="none", disable_tqdm=True, save_strategy="no",
                             use_cpu=True)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomTokens(num_labels=2), bitfit_config=BitFitConfig())
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    base = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", config=cfg).eval()
    pristine = {n: p.detach().clone() for n, p in base.named_parameters()}
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_base = base(input_ids=ids).logits
        h1 = apply_delta(base, str(tmp_path / "delta"))
        want_delta = base(input_ids=ids).logits
        h2 = apply_delta(base, str(tmp_path / "delta"))
        first, second = (h1, h2) if order == "first-applied first" else (h2, h1)
        first.remove()
        assert torch.equal(base(input_ids=ids).logits, want_delta)  # the other application still holds
        second.remove()
        assert torch.equal(base(input_ids=ids).logits, want_base)
    now = dict(base.named_parameters())
    assert set(now) == set(pristine)
    assert all(torch.equal(now[n], v) for n, v in pristine.items())


def test_full_mode_resumes_its_own_checkpoint_of_a_peft_model(tmp_path):
    """A user's own PEFT model trained with mode='full' (Trainer's own training) resumes its checkpoint as
    Trainer does, to the same adapter."""
    from transformers import TrainingArguments

    def trainer(out, steps):
        torch.manual_seed(0)
        model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                                       target_modules=["query", "value"]))
        args = TrainingArguments(output_dir=str(out), learning_rate=1e-2, max_steps=steps, save_steps=2,
                                 per_device_train_batch_size=8, report_to="none", disable_tqdm=True, use_cpu=True,
                                 seed=0)
        return BitFitTrainer(model=model, args=args, train_dataset=RandomTokens(num_labels=2),
                             bitfit_config=BitFitConfig(mode="full"))

    whole = trainer(tmp_path / "whole", 4)
    whole.train()
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", cut / "checkpoint-2")
    resumed = trainer(cut, 4)
    resumed.train(resume_from_checkpoint=str(cut / "checkpoint-2"))
    a = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    b = dict(resumed.model.named_parameters())
    assert a and all(torch.allclose(p, b[n], atol=1e-6) for n, p in a.items())


@pytest.mark.parametrize(("runner", "family", "head"), [("squad", "phi3", "QuestionAnswering"),
                                                        ("pos", "gemma3_text", "TokenClassification")])
def test_a_family_without_the_tasks_head_class_is_one_line(runner, family, head, tmp_path):
    """transformers has no Phi-3 QA and no Gemma 3 token-classification class: one line naming the family, the
    task and what to do, before any weights are read (was a 22-line traceback)."""
    import importlib

    folder = tmp_path / family
    T.AutoModel.from_config(bias_free_config(family)).save_pretrained(folder)
    T.PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer()._tokenizer, pad_token="<pad>", eos_token="</s>",
                              unk_token="<unk>").save_pretrained(folder)
    data = {"squad": ["--train_file", f"{FIXTURES}/squad/official.json", "--validation_file",
                      f"{FIXTURES}/squad/flat.jsonl"],
            "pos": ["--train_file", f"{FIXTURES}/pos/conll2000.txt", "--validation_file",
                    f"{FIXTURES}/pos/conll2000.txt", "--tag_column", "1"]}[runner]
    main = importlib.import_module(f"bitfit_tasks.tasks.{runner}.run").main
    with pytest.raises(UsageError, match=rf"transformers {T.__version__} has no {head} model for model_type "
                                         rf"'{family}' \(.*\); run_{runner}.py needs one: choose a model of "
                                         r"another family"):
        main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *data])


def test_resume_skips_a_damaged_newest_checkpoint(tiny_model_dir, tmp_path, caplog):
    """A 0-byte bitfit_delta.json in the newest checkpoint: --resume_from_checkpoint true resumes from the newest
    intact one and says which and why; the damaged one named explicitly is refused in one line."""
    from bitfit_tasks.tasks.checkpoints import last_complete_checkpoint
    from bitfit_tasks.tasks.glue.run import main

    out = tmp_path / "run"
    args = glue_run(tiny_model_dir, "mrpc", out, "--num_train_epochs", "2", "--save_strategy", "epoch")
    main(args)
    steps = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(steps) == 2
    (steps[-1] / "bitfit_delta.json").write_text("")
    import logging

    with caplog.at_level(logging.WARNING, logger="bitfit_tasks"):
        assert last_complete_checkpoint(str(out)) == str(steps[0])
    assert f"skipping {steps[-1]}" in caplog.text and "not valid JSON" in caplog.text
    main([*args, "--resume_from_checkpoint", "true", "--num_train_epochs", "2"])
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] == str(steps[0])
    (steps[-1] / "bitfit_delta.json").write_text("")  # the resumed run wrote it again: damage it once more
    with pytest.raises(UsageError, match=rf"--resume_from_checkpoint {steps[-1]}: .*bitfit_delta.json is not valid "
                                         r"JSON"):
        main([*args, "--resume_from_checkpoint", str(steps[-1])])


def test_adapter_weights_are_read_onto_the_cpu(tmp_path, monkeypatch):
    """PEFT loads an adapter's tensors onto an accelerator where there is one; the delta is built on the CPU
    (as its tensors are kept), whatever device the base values are on: the read asks for the CPU."""
    seen = {}
    real = peft.utils.load_peft_weights

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    cfg = tiny_model("bert", num_labels=3).config
    torch.manual_seed(0)
    T.BertModel(cfg).save_pretrained(tmp_path / "base")
    model = T.BertForSequenceClassification.from_pretrained(tmp_path / "base", config=cfg)
    peft.get_peft_model(model, peft.BeftConfig(task_type="SEQ_CLS", target_modules=["value"])).save_pretrained(
        str(tmp_path / "adapter"))
    monkeypatch.setattr(peft.utils, "load_peft_weights", spy)
    from bitfit_tasks.peft_interop.convert import delta_from_peft

    delta = delta_from_peft(tmp_path / "adapter")
    assert seen.get("device") == "cpu"
    assert all(t.device.type == "cpu" for t in delta.tensors.values())
