"""The ``README.md`` of a delta folder: a Hugging Face model card (``huggingface_hub.ModelCard``)."""

from __future__ import annotations

import json
import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..core.quantized import bnb_config_text


def model_card(output_dir: str | os.PathLike, meta: dict[str, Any], *, weights_file: str, n_trainable: int,
               n_total: int, metrics: dict[str, Any] | None = None) -> ModelCard:
    """``README.md`` of a delta folder: what it is (bias-only, not a full model), its base and that
    base's fingerprint, the trained terms and counts, the evaluation of these tensors, and the lines that load it."""
    base = meta.get("base_model") or "BASE_MODEL"
    task_config = meta.get("task_config") or {}
    labels = task_config.get("id2label")
    scores = {k: v for k, v in (metrics or {}).items()
              if isinstance(v, int | float) and not k.endswith(("runtime", "per_second"))}
    # The metadata through the hub's own ModelCardData, so the YAML header is what the Hub validates.
    data = ModelCardData(library_name="bitfit-tasks", base_model=meta.get("base_model"),
                         tags=["bitfit", "bias-only", "peft"])
    lines = [
        f"# BitFit delta: {meta.get('task_class')} on `{base}`", "",
        "This folder is a **bias-only delta** (BitFit, Ben-Zaken et al., 2021), not a full model: "
        f"`{weights_file}` holds only the trained tensors, to be applied onto the base model `{base}`. "
        "It is refused on any other base (fingerprint of the frozen base weights: "
        f"`{meta.get('base_fingerprint')}`; the same base in fp32, bf16 or fp16 is accepted).", "",
        f"- task: {task_config.get('finetuning_task') or meta.get('task_class')}",
        f"- mode: `{meta.get('mode')}`; bias terms: {', '.join(meta.get('terms') or {}) or '-'}",
        f"- trainable params: {n_trainable:,d} of {n_total:,d} ({100.0 * n_trainable / max(n_total, 1):.4f}%)",
    ]
    quant = meta.get("quantization")
    head_modules = sorted({n.rpartition(".")[0] for n in meta.get("head") or []})
    bnb = bnb_config_text(quant, head_modules)
    if quant:
        how = f"{quant.get('bits')}-bit" + (f" {quant.get('quant_type')}" if quant.get("quant_type") else "")
        lines.append(f"- trained on a quantized base: {quant.get('method')} {how}; it re-applies exactly onto the "
                     "same quantized load (below) and loads onto the full-precision base too (outputs then differ "
                     "by the quantization error)")
    if labels:
        lines.append(f"- labels: {json.dumps(labels)}")
    if scores:
        lines.append("- evaluation of these tensors: " + ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}"
                                                              for k, v in scores.items()))
    if meta.get("task_config") is None:
        # Saved from the user's own nn.Module (no transformers config): only the user can build it.
        lines += ["", f"Load it onto the `{meta.get('task_class')}` it was trained from (base + delta = the "
                  "fine-tuned model):", "", "```python", "from bitfit_tasks import apply_delta", "",
                  f"model = {meta.get('task_class')}(...)  # built and loaded as for training",
                  f"apply_delta(model, {str(output_dir)!r})", "```", ""]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    load = ["from bitfit_tasks import load_task_model", "", f"model = load_task_model({base!r}, {str(output_dir)!r})"]
    if bnb:  # the same quantized load it was trained on (bitsandbytes' own default 4-bit type is fp4)
        load = ["import torch", "from transformers import BitsAndBytesConfig", "", *load[:2],
                f"model = load_task_model({base!r}, {str(output_dir)!r},",
                f"                        quantization_config={bnb})"]
    lines += ["", "Load it (base + delta = the fine-tuned model):", "", "```python", *load,
              "```", "",
              "After uploading this folder to the Hub (`Delta.push_to_hub` or `BitFitTrainer.push_to_hub`), "
              "pass its repository id instead of the folder.",
              f"Merge it into a full model: `bitfit-delta export {output_dir} --output merged/`.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
