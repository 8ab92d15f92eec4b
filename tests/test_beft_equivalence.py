"""BitFit with added biases equals PEFT's BEFT where the two overlap.

BEFT (``peft.BeftConfig``) adds a zero-initialised bias vector to chosen ``nn.Linear`` layers and
trains it with the task head. On a model built without biases, BitFit's added biases on the same
layers are the same method: same seed, data and optimizer must give the same losses step by step
and the same final bias values. This is the check that the added-bias path is right (a wrong
initial value, a missing or extra layer, a frozen head or an unfrozen weight all break it).

Run with ``-s`` to see the two loss trajectories.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable

import pytest
import torch
import transformers as T
from torch import nn

from bitfit_tasks import BitFitConfig, BitFitTrainer, prepare_model

peft = pytest.importorskip("peft", reason="the BEFT comparison needs peft (the `bench` extra)")
if not hasattr(peft, "BeftConfig"):
    pytest.skip("peft has no BeftConfig (BEFT arrived in peft 0.20)", allow_module_level=True)

STEPS = 24
BATCH = 4
NUM_LABELS = 3


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, num_labels=NUM_LABELS, attention_dropout=0.0)
    return T.LlamaForSequenceClassification(cfg)


def tiny_modernbert() -> nn.Module:
    torch.manual_seed(0)
    cfg = T.ModernBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, cls_token_id=1, sep_token_id=2, num_labels=NUM_LABELS,
                             global_attn_every_n_layers=1, attention_dropout=0.0, mlp_dropout=0.0,
                             embedding_dropout=0.0, classifier_dropout=0.0)
    return T.ModernBertForSequenceClassification(cfg)


# family -> (builder, BitFit terms, BEFT target modules, the head PEFT must train: modules_to_save).
# BEFT biases the whole of ModernBERT's fused Wqkv, which is BitFit's `qkv` term; both Wo's match "Wo".
CASES: dict[str, tuple[Callable[[], nn.Module], list[str], list[str], list[str]]] = {
    "llama": (tiny_llama, ["q", "k", "v", "m1"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["score"]),
    "modernbert": (tiny_modernbert, ["qkv", "m1", "m2", "m3"], ["Wqkv", "Wo", "Wi"], ["head", "classifier"]),
}


def batches() -> list[dict[str, torch.Tensor]]:
    """Two fixed batches of random tokens, every other row right-padded (the decoder head reads the last real token)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2 * BATCH, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 9:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(0, NUM_LABELS, (2 * BATCH,), generator=g)
    return [{"input_ids": ids[i:i + BATCH], "attention_mask": mask[i:i + BATCH], "labels": labels[i:i + BATCH]}
            for i in range(0, 2 * BATCH, BATCH)]


def bitfit_side(family: str) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The model with BitFit's added biases, and those biases by module name."""
    build, terms, _, _ = CASES[family]
    model = build()
    state = prepare_model(model, BitFitConfig(bias_terms=terms))
    params = dict(model.named_parameters())
    return model, {n.removesuffix(".bias"): params[n] for n in state.added}


def beft_side(family: str) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The PEFT BEFT model, and its bias vectors by (base model) module name."""
    build, _, targets, heads = CASES[family]
    with pytest.warns(UserWarning, match="no bias term"):  # BEFT's own note that such a base cannot merge
        model = peft.get_peft_model(build(), peft.BeftConfig(target_modules=targets, task_type="SEQ_CLS",
                                                             modules_to_save=heads))
    return model, {n.removeprefix("base_model.model.").removesuffix(".beft_bias.default"): p
                   for n, p in model.named_parameters() if n.endswith(".beft_bias.default")}


def train_loop(model: nn.Module) -> list[float]:
    """Plain AdamW on whatever requires grad, the two batches in turn, no dropout anywhere."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)
    data = batches()
    losses = []
    for step in range(STEPS):
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def show(title: str, ours: list[float], beft: list[float]) -> None:
    print(f"\n{title}\n| step | BitFit (added biases) | PEFT BEFT | abs diff |\n|---|---|---|---|")
    for i in [*range(3), *range(len(ours) - 3, len(ours))]:
        print(f"| {i + 1} | {ours[i]:.8f} | {beft[i]:.8f} | {abs(ours[i] - beft[i]):.1e} |")


def assert_same_run(ours: list[float], beft: list[float], our_bias: dict, beft_bias: dict) -> None:
    assert len(ours) == len(beft) == STEPS
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(beft), rtol=1e-5, atol=1e-6)
    assert ours[-1] < 0.8 * ours[0], "the runs did not train: equal losses would prove nothing"
    assert sorted(our_bias) == sorted(beft_bias)
    diff = max((our_bias[k].detach() - beft_bias[k].detach().flatten()).abs().max().item() for k in our_bias)
    moved = min(our_bias[k].detach().abs().max().item() for k in our_bias)
    print(f"final biases: {len(our_bias)} tensors, max |BitFit - BEFT| = {diff:.1e}; "
          f"smallest max |bias| = {moved:.2e}")
    assert moved > 1e-3, "an added bias did not move from zero"
    for k in our_bias:
        torch.testing.assert_close(our_bias[k].detach(), beft_bias[k].detach().flatten(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", sorted(CASES))
def test_bitfit_added_biases_equal_beft_loop(family: str) -> None:
    ours, our_bias = bitfit_side(family)
    beft, beft_bias = beft_side(family)
    # Same start: same seed, the same weights, the same 8 biased layers, and the same trainable
    # set (those biases + the head, nothing else).
    base = {re.sub(r"^base_model\.model\.|\.base_layer|\.original_module", "", n): p
            for n, p in beft.named_parameters() if ".modules_to_save." not in n and "beft_bias" not in n}
    assert {n: p for n, p in ours.named_parameters() if n.removesuffix(".bias") not in our_bias}.keys() == base.keys()
    for n, p in base.items():
        assert torch.equal(p, ours.get_parameter(n)), n
    assert len(our_bias) == 8 and sorted(our_bias) == sorted(beft_bias)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_ours == sum(p.numel() for p in beft.parameters() if p.requires_grad)

    loss_ours, loss_beft = train_loop(ours), train_loop(beft)
    show(f"{family}: manual AdamW loop, {STEPS} steps", loss_ours, loss_beft)
    assert_same_run(loss_ours, loss_beft, our_bias, beft_bias)


class _Batches(torch.utils.data.Dataset):
    def __init__(self) -> None:
        data = batches()
        self.rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(BATCH)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def test_bitfit_trainer_equals_trainer_with_beft() -> None:
    """The user-facing paths: BitFitTrainer on the bias-free Llama (it adds the biases) against
    transformers' Trainer on PEFT's BEFT model; same TrainingArguments, accumulation 1."""
    losses: dict[str, list[float]] = {"ours": [], "beft": []}

    def record(key: str):
        return lambda _mod, _args, out: losses[key].append(out.loss.item())

    with tempfile.TemporaryDirectory() as tmp:
        args = T.TrainingArguments(output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=STEPS,
                                   learning_rate=3e-3, gradient_accumulation_steps=1, use_cpu=True, seed=0,
                                   save_strategy="no", report_to=[], logging_steps=STEPS, disable_tqdm=True)
        ours = tiny_llama()
        ours.register_forward_hook(record("ours"))
        trainer = BitFitTrainer(model=ours, args=args, train_dataset=_Batches(),
                                bitfit_config=BitFitConfig(bias_terms=CASES["llama"][1]))
        trainer.train()
        beft, beft_bias = beft_side("llama")
        beft.register_forward_hook(record("beft"))
        T.Trainer(model=beft, args=args, train_dataset=_Batches()).train()
    params = dict(ours.named_parameters())
    our_bias = {n.removesuffix(".bias"): params[n] for n in trainer.bitfit_state.added}
    show(f"llama: BitFitTrainer vs Trainer + BEFT, {STEPS} steps", losses["ours"], losses["beft"])
    assert_same_run(losses["ours"], losses["beft"], our_bias, beft_bias)
