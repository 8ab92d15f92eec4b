"""Deltas to PEFT: a BitFit delta written as a PEFT BEFT adapter folder, which ``PeftModel.from_pretrained``
loads onto the base.

BEFT (PEFT's bias-term fine-tuning) adds a vector to the output of chosen ``nn.Linear`` layers, so a
changed Linear bias ``b`` over a base bias ``b0`` (zero where BitFit added the bias) is the BEFT vector
``b - b0``. What BEFT cannot hold -- the bias of a LayerNorm (or any other non-Linear module) and the
task head -- goes into ``modules_to_save``: PEFT stores those modules whole and swaps them in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .delta import Delta, task_config_for, task_model_class
from .errors import UsageError

# PEFT's task types for the task classes BitFit trains.
PEFT_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                   "ForQuestionAnswering": "QUESTION_ANS"}


def _peft():
    try:
        import peft
    except ImportError:
        raise UsageError("exporting to PEFT needs the peft package: pip install 'bitfit-tasks[bench]' (or pip "
                         "install peft>=0.20).") from None
    if not hasattr(peft, "BeftConfig"):
        raise UsageError(f"peft {peft.__version__} has no BEFT (BeftConfig); upgrade: pip install 'peft>=0.20'.")
    return peft


def base_task_model(base_model: str, delta: Delta) -> nn.Module:
    """The base with the delta's task class and config, as ``load_task_model`` builds it, before the delta."""
    import transformers

    cls = task_model_class(delta.meta["task_class"])
    config = task_config_for(transformers.AutoConfig.from_pretrained(base_model), delta)
    return cls.from_pretrained(base_model, config=config)


@torch.no_grad()
def export_peft(base_model: str, delta: Delta | str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write ``delta`` as a PEFT BEFT adapter into ``output_dir`` (new or empty): Linear bias changes as BEFT
    vectors, other changed modules (LayerNorms) and the head in ``modules_to_save``. Returns the folder."""
    peft = _peft()
    delta = delta if isinstance(delta, Delta) else Delta.from_pretrained(delta)
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--output {out} is {'a file' if not out.is_dir() else 'a folder that is not empty'}; give "
                         "a new or empty folder for the PEFT adapter.")
    suffix = next((s for s in PEFT_TASK_TYPES if delta.meta["task_class"].endswith(s)), None)
    if suffix is None:
        raise UsageError(f"{delta.meta['task_class']} has no PEFT task type; deltas of {sorted(PEFT_TASK_TYPES)} "
                         "task classes export to PEFT.")
    if delta.meta.get("mode") != "bitfit":
        raise UsageError(f"a {delta.meta.get('mode')!r} delta changes weight matrices, which a BEFT adapter cannot "
                         "hold; only bias-only ('bitfit') deltas export to PEFT.")
    model = base_task_model(base_model, delta)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    head = set(delta.meta.get("head", []))
    linear, others = {}, set()
    for name in delta.tensors:
        mod_name, _, attr = name.rpartition(".")
        if name in head:
            others.add(name.split(".")[0])  # the head module, top level (classifier, score, qa_outputs, head)
        elif attr == "bias" and isinstance(modules.get(mod_name), nn.Linear):
            linear[mod_name] = name
        elif attr == "bias" and name in params:
            others.add(mod_name)  # a LayerNorm or GPT-2's Conv1D: saved whole
        elif attr == "bias" and mod_name in modules:
            raise UsageError(f"the delta added a bias to {mod_name} ({type(modules[mod_name]).__name__}), which "
                             "the base builds without one; a PEFT adapter can add biases to Linear layers only "
                             "(BEFT), so this delta cannot be exported. Serve it with bitfit-tasks, or train without "
                             "that term.")
        else:
            raise UsageError(f"delta tensor {name} is not a bias; only bias-only deltas export to PEFT.")
    # The base's bias under each target: zero where the delta added it (the module has none).
    base_bias = {m: (params[n].detach().clone() if n in params else None) for m, n in linear.items()}
    config = peft.BeftConfig(task_type=PEFT_TASK_TYPES[suffix], target_modules=sorted(linear) or None,
                             modules_to_save=sorted(others) or None,
                             base_model_name_or_path=delta.meta.get("base_model") or base_model)
    if not linear:
        raise UsageError("the delta changes no Linear bias, so a BEFT adapter would hold nothing but "
                         "modules_to_save; export it with bitfit-delta export instead.")
    peft_model = peft.get_peft_model(model, config)
    inner = dict(peft_model.named_modules())
    for mod_name, name in linear.items():
        layer = inner[f"base_model.model.{mod_name}"]
        value = delta.tensors[name].to(torch.float32)
        if base_bias[mod_name] is not None:
            value = value - base_bias[mod_name].to(torch.float32)
        layer.beft_bias["default"].copy_(value.view(1, -1).to(layer.beft_bias["default"].dtype))
    saved = dict(peft_model.named_parameters())
    for name, value in delta.tensors.items():
        mod_name = name.rpartition(".")[0]
        if mod_name in linear.keys() and name not in head:
            continue
        top = name.split(".")[0] if name in head else mod_name
        # PEFT keeps the trained copy of a saved module at <module>.modules_to_save.default.
        key = f"base_model.model.{top}.modules_to_save.default{name[len(top):]}"
        if key not in saved:
            raise UsageError(f"PEFT did not wrap {top} for modules_to_save (no {key}); this delta cannot be exported.")
        saved[key].copy_(value.to(saved[key].dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed into place when complete
    try:
        peft_model.save_pretrained(str(tmp))
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
