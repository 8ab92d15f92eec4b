"""LoRA and BEFT as modes of BitFitTrainer and the runners (``--mode lora`` / ``--mode beft``), through the
``peft`` library: the task model is wrapped in a ``PeftModel`` whose adapters sit on the Linear layers named in
the paper's notation (``--peft_targets q v``), found through the same per-architecture maps BitFit selects its
biases with, and whose task head is trained and saved whole (``modules_to_save``). What such a run saves is
PEFT's own adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``): ``PeftModel.from_pretrained``
loads it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..core.bias_maps import BiasMap, get_bias_map
from ..core.config import PEFT_MODES, PEFT_TARGET_TERMS, BitFitConfig
from ..core.peft_detect import is_peft_model
from ..core.selection import backbone_of, full_prefix, head_parameter_names
from ..utils.errors import UsageError

logger = logging.getLogger("bitfit_tasks")

# PEFT's task types for the task classes the runners train.
PEFT_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                   "ForQuestionAnswering": "QUESTION_ANS"}


def import_peft(purpose: str = "--mode lora / beft"):
    """The ``peft`` module, or one line naming the extra to install (BEFT needs peft 0.20)."""
    try:
        import peft
    except ImportError:
        raise UsageError(f"{purpose} needs the peft package: pip install 'bitfit-tasks[peft]' (or pip install "
                         "'peft>=0.20').") from None
    if not hasattr(peft, "BeftConfig"):
        raise UsageError(f"peft {peft.__version__} has no BEFT (BeftConfig); upgrade: pip install 'peft>=0.20'.")
    return peft


def peft_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    suffix = next((s for s in PEFT_TASK_TYPES if name.endswith(s)), None)
    if suffix is None:
        raise UsageError(f"{name} has no PEFT task type; --mode lora / beft train the task classes "
                         f"*{', *'.join(PEFT_TASK_TYPES)}.")
    return PEFT_TASK_TYPES[suffix]


def peft_target_modules(model: nn.Module, terms: list[str], *, bias_map: BiasMap | None = None,
                        mode: str = "lora") -> list[str]:
    """Full module names (in ``model``) of the Linear layers that ``terms`` (paper notation) name, every layer,
    in model order. A term the architecture does not have raises, naming those it has; ``q``/``k``/``v`` of a
    fused query/key/value projection name that whole projection (an adapter on a module adapts all of it)."""
    bmap = get_bias_map(model, bias_map)
    patterns = bmap.module_patterns()
    backbone = backbone_of(model)
    modules = dict(backbone.named_modules())
    has = [t for t in PEFT_TARGET_TERMS if t in patterns and any(patterns[t].fullmatch(n) for n in modules)]
    fused = [t for t in terms if t in ("q", "k", "v") and t not in has and "qkv" in has]
    if fused:
        # GPT-2's c_attn, BLOOM's and GPT-NeoX's query_key_value: one Linear computes q, k and v.
        logger.info("%s computes query, key and value in one projection (qkv): %s adapts it whole for %s",
                    type(model).__name__, mode, fused)
        terms = list(dict.fromkeys("qkv" if t in fused else t for t in terms))
    for term in terms:
        if term not in has:
            raise UsageError(f"--peft_targets {term}: {type(model).__name__} has no such layer; its {mode} targets "
                             f"are {has}.")
    # LoRA adapts Linear layers and GPT-2's Conv1D; PEFT's BEFT adapts nn.Linear only.
    kinds = (nn.Linear,) if mode == "beft" else (nn.Linear, *_conv1d())
    found = []
    for name, module in modules.items():
        term = next((t for t in terms if patterns[t].fullmatch(name)), None)
        if term is None:
            continue
        if not isinstance(module, kinds):
            kind_names = ", ".join(k.__name__ for k in kinds)
            raise UsageError(f"--peft_targets {term}: {full_prefix(model)}{name} is a {type(module).__name__}, "
                             f"which PEFT's {mode} does not adapt (it takes {kind_names} layers); choose other "
                             f"targets of {has}, or --mode bitfit, which trains this layer's bias.")
        found.append(name)
    if bmap.fused_qkv is not None and {"q", "k", "v"} & set(terms):
        logger.info("%s fuses query, key and value in one projection (%s): %s adapts it whole for %s",
                    type(model).__name__, bmap.fused_qkv, mode, [t for t in terms if t in ("q", "k", "v")])
    prefix = full_prefix(model)
    return [prefix + n for n in found]


def _conv1d() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every transformers this package supports has it
        return ()
    return (Conv1D,)


def head_module_names(model: nn.Module) -> list[str]:
    """The head's top-level modules (classifier, score, qa_outputs, DistilBERT's pre_classifier ...): PEFT trains
    and saves them whole (``modules_to_save``)."""
    return list(dict.fromkeys(n.split(".")[0] for n in head_parameter_names(model)))


def peft_config_for(model: nn.Module, config: BitFitConfig, *, bias_map: BiasMap | None = None):
    """The ``LoraConfig`` / ``BeftConfig`` of ``config`` for ``model`` (a plain transformers task model)."""
    peft = import_peft()
    targets = peft_target_modules(model, config.targets, bias_map=bias_map, mode=config.mode)
    # The whole head is saved with the adapter even when it stays frozen (prepare_model freezes it): its random
    # initialisation is not in the base checkpoint, and PEFT's own default keeps only classifier / score.
    common = {"task_type": peft_task_type(model), "target_modules": targets,
              "modules_to_save": head_module_names(model)}
    if config.mode == "lora":
        return peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                               bias="none", **common)
    return peft.BeftConfig(**common)


def wrap_with_peft(model: nn.Module, config: BitFitConfig, *, bias_map: BiasMap | None = None) -> nn.Module:
    """``peft.get_peft_model`` with :func:`peft_config_for`; a model PEFT already wrapped is refused (its
    adapters are set up already: train it with mode 'full')."""
    if config.mode not in PEFT_MODES:
        raise ValueError(f"mode {config.mode!r} is not a PEFT mode {list(PEFT_MODES)}.")
    if is_peft_model(model):
        raise UsageError(f"mode {config.mode!r} wraps a plain model in its own adapters, and "
                         f"{type(model).__name__} is a PEFT model already; pass the model unwrapped, or train it "
                         "as set up with mode 'full'.")
    peft = import_peft()
    peft_config = peft_config_for(model, config, bias_map=bias_map)
    # What PEFT changes in place besides injecting its layers, so that unwrap_peft can put it back.
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    wrapped = peft.get_peft_model(model, peft_config)
    wrapped._bitfit_requires_grad = grads
    return wrapped


def unwrap_peft(wrapped: nn.Module) -> nn.Module:
    """Undo :func:`wrap_with_peft`: PEFT's layers taken out again (``unload``: the base layers and the head back
    in place, untouched) and every ``requires_grad`` as it was; returns the model as it was given."""
    grads = getattr(wrapped, "_bitfit_requires_grad", {})
    model = wrapped.unload()
    for name, p in model.named_parameters():
        if name in grads:
            p.requires_grad_(grads[name])
    return model


# What an adapter's options must match for a checkpoint to resume in this run.
_RESUME_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")


def _comparable(value: Any) -> Any:
    value = getattr(value, "value", value)  # PeftType enum
    return sorted(value) if isinstance(value, list | set | tuple) else value


def adapter_mismatch(current, checkpoint: str | os.PathLike) -> dict[str, tuple[Any, Any]]:
    """The options in which the adapter saved in ``checkpoint`` differs from ``current`` (a PeftConfig):
    ``{key: (saved, now)}``; empty when they agree."""
    saved = json.loads(Path(checkpoint, "adapter_config.json").read_text())
    now = current.to_dict()
    return {k: (_comparable(saved.get(k)), _comparable(now.get(k))) for k in _RESUME_KEYS
            if _comparable(saved.get(k)) != _comparable(now.get(k))}


def write_adapter_extras(model: nn.Module, output_dir: str | os.PathLike, *, n_trainable: int, n_total: int,
                         metrics: dict[str, Any] | None = None, origin: str | None = None) -> None:
    """Beside PEFT's adapter files: the task model's config (``config.json``: the head's size and labels and a
    decoder's padding token, which the adapter alone does not hold) and a model card with the lines that load it
    (``README.md``, replacing PEFT's template). ``origin``: how the adapter was made (default: a training run)."""
    from ..utils.fileio import atomic_write_text

    task = model.get_base_model()
    task.config.save_pretrained(str(output_dir))
    peft_config = model.peft_config["default"]
    base = peft_config.base_model_name_or_path or "BASE_MODEL"
    cls = type(task).__name__
    auto = "AutoModelFor" + next((s.removeprefix("For") for s in PEFT_TASK_TYPES if cls.endswith(s)), "")
    scores = {k: v for k, v in (metrics or {}).items()
              if isinstance(v, int | float) and not k.endswith(("runtime", "per_second"))}
    kind = getattr(peft_config.peft_type, "value", peft_config.peft_type)
    lines = [
        "---", "library_name: peft", f"base_model: {base}", "tags: [bitfit-tasks, " + kind.lower() + "]", "---", "",
        f"# {kind} adapter: {cls} on `{base}`", "",
        f"A PEFT {kind} adapter {origin or f'trained by bitfit-tasks (`--mode {kind.lower()}`)'}, with the task "
        "head (`modules_to_save`). `config.json` is the task model's config (its labels, head size and padding "
        "token).", "",
        f"- targets: {len(peft_config.target_modules or [])} modules, "
        f"{', '.join(sorted({t.rsplit('.', 1)[-1] for t in peft_config.target_modules or []}))} of each layer",
        f"- trainable params: {n_trainable:,d} of {n_total:,d} ({100.0 * n_trainable / max(n_total, 1):.4f}%)",
    ]
    if kind == "LORA":
        lines.append(f"- r {peft_config.r}, alpha {peft_config.lora_alpha}, dropout {peft_config.lora_dropout}")
    if scores:
        lines.append("- evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    lines += ["", "```python", f"from transformers import AutoConfig, {auto}", "from peft import PeftModel", "",
              'adapter = "THIS_FOLDER"',
              "# the task's head size, labels and padding token; the adapter brings the trained head",
              f'base = {auto}.from_pretrained("{base}", config=AutoConfig.from_pretrained(adapter),',
              "                                ignore_mismatched_sizes=True)",
              "model = PeftModel.from_pretrained(base, adapter)"]
    pad = getattr(task.config, "pad_token_id", None)
    if pad is not None:  # a decoder tokenizer (Llama's) often has none; the model was trained padding with this id
        lines.append(f"# padded batches: pad with id {pad} (a tokenizer without a pad token: "
                     f"tokenizer.pad_token_id = {pad})")
    lines += ["```", ""]
    atomic_write_text(Path(output_dir, "README.md"), "\n".join(lines))
