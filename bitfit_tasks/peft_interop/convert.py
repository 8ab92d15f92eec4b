"""Deltas to and from PEFT: a BitFit delta written as a PEFT BEFT adapter folder, which
``PeftModel.from_pretrained`` loads onto the base; and a BEFT adapter read as a delta, which
``MultiTaskBitFit`` serves beside BitFit's own (mixed-task batches included).

BEFT (PEFT's bias-term fine-tuning) adds a vector to the output of chosen ``nn.Linear`` layers, so a
changed Linear bias ``b`` over a base bias ``b0`` (zero where BitFit added the bias) is the BEFT vector
``b - b0``. What BEFT cannot hold -- the bias of a LayerNorm (or any other non-Linear module) and the
task head -- goes into ``modules_to_save``: PEFT stores those modules whole and swaps them in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.selection import bias_size, head_parameter_names
from ..core.signature import sign
from ..core.skeleton import meta_skeleton
from ..delta.apply import base_task_model, quietly_from_pretrained
from ..delta.format import Delta, delta_of
from ..utils.errors import UsageError, first_line
from ..utils.fileio import check_new_folder, publish_folder
from .modes import PEFT_TASK_TYPES, import_peft, write_adapter_extras


@torch.no_grad()
def export_peft(base_model: str, delta: Delta | str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write ``delta`` as a PEFT BEFT adapter into ``output_dir`` (new or empty): Linear bias changes as BEFT
    vectors, other changed modules (LayerNorms) and the head in ``modules_to_save``. Returns the folder."""
    peft = import_peft("exporting to PEFT")
    delta = delta if isinstance(delta, Delta) else Delta.from_pretrained(delta)
    out = Path(output_dir)
    check_new_folder(out, "PEFT adapter", name="the output")  # positional in `bitfit-delta export-peft`
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
    n_total = sum(p.numel() for p in model.parameters())
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

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp))
        # config.json carries what the base's own config lacks: the head's labels and a decoder's pad token.
        write_adapter_extras(peft_model, tmp, n_trainable=sum(t.numel() for t in delta.tensors.values()),
                             n_total=n_total, origin="exported from a bitfit-tasks delta (`bitfit-delta export-peft`)")

    return publish_folder(out, write)


PEFT_TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                     "QUESTION_ANS": "AutoModelForQuestionAnswering"}
# PEFT's prefix of every tensor name in an adapter file (the task model's own names follow it).
_PEFT_PREFIX = "base_model.model."


def is_peft_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


@torch.no_grad()
def delta_from_peft(adapter: str | os.PathLike, base_model: str | None = None, *,
                    backbone: Mapping[str, torch.Tensor] | None = None, base_config=None) -> Delta:
    """A PEFT BEFT adapter (a folder, or a Hub id PEFT can fetch) as a BitFit delta on ``base_model`` (default:
    the adapter's ``base_model_name_or_path``): each BEFT vector added to its Linear's base bias (a bias created
    where the base has none), the ``modules_to_save`` modules' changed tensors, and the head. The delta then
    serves through ``apply_delta``, ``load_task_model`` and ``MultiTaskBitFit``, mixed-task batches included.

    Only the adapter's own files are read: its config, its weights and the task model's ``config.json`` beside
    them (head size, labels, a decoder's pad token; written by bitfit-tasks' runs and ``export-peft``; an adapter
    without one takes the base's config with the head size of its saved head). The base values under the BEFT
    vectors come from ``backbone`` (the backbone's tensors by their names in it, as ``MultiTaskBitFit`` holds
    them, with its config as ``base_config``) or, without it, from loading the base once. A PEFT adapter records
    its base by name only, so with ``backbone`` the delta's base signature is that backbone's."""
    import transformers

    peft = import_peft("reading a PEFT adapter")
    try:
        config = peft.PeftConfig.from_pretrained(str(adapter))
    except (OSError, ValueError) as err:
        raise UsageError(f"{adapter}: not a PEFT adapter folder ({str(err).splitlines()[0][:160]}).") from None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "BEFT":
        raise UsageError(f"{adapter} is a PEFT {kind} adapter; only BEFT adapters (bias vectors) are "
                         "BitFit deltas. Serve other adapters with PEFT.")
    task = str(getattr(config.task_type, "value", config.task_type))
    if task not in PEFT_TASK_CLASSES:
        raise UsageError(f"{adapter}: PEFT task_type {config.task_type!r} has no BitFit task class; adapters of task "
                         f"types {sorted(PEFT_TASK_CLASSES)} load as deltas.")
    base = base_model or config.base_model_name_or_path
    if not base:
        raise UsageError(f"{adapter}: the adapter records no base model; pass base_model=.")
    # On the CPU, as the delta's tensors are (PEFT would load them onto an accelerator where there is one).
    weights = {k.removeprefix(_PEFT_PREFIX): v
               for k, v in peft.utils.load_peft_weights(str(adapter), device="cpu").items()}
    auto = getattr(transformers, PEFT_TASK_CLASSES[task])
    skeleton = meta_skeleton(auto, _task_config(adapter, base, auto, weights, transformers, base_config))
    prefix = skeleton.base_model_prefix
    if backbone is not None:
        base_values = {f"{prefix}.{n}": t for n, t in backbone.items()}
    else:
        base_values = dict(_load_base(adapter, type(skeleton), base, skeleton.config).named_parameters())
    native = {n for n, _ in skeleton.named_parameters()}  # not the biases other tasks added to a shared backbone
    base_values = {n: t for n, t in base_values.items() if n in native}
    modules = dict(skeleton.named_modules())
    head = set(head_parameter_names(skeleton))
    tensors: dict[str, torch.Tensor] = {}
    added: dict[str, int] = {}
    beft: list[str] = []
    for key, value in weights.items():
        if key.endswith(".beft_bias"):
            mod_name = key.removesuffix(".beft_bias")
            name = f"{mod_name}.bias"
            if name in base_values:
                start = base_values[name].detach().to("cpu", torch.float32)
            else:  # the base builds this Linear without a bias: BitFit adds a zero one
                added[name] = bias_size(modules[mod_name])
                start = torch.zeros(added[name])
            tensors[name] = (start + value.to(torch.float32).reshape(-1)).to(value.dtype)
            beft.append(name)
        elif key in head or key not in base_values or not torch.equal(value, base_values[key].to("cpu", value.dtype)):
            tensors[key] = value  # a saved module's (modules_to_save) head or changed tensor
    missing = sorted(head - set(tensors))
    if missing:
        raise UsageError(f"{adapter}: the adapter holds no trained head ({missing[0]} and others); an adapter of a "
                         "task model saves its head (modules_to_save).")
    signature = sign((n, t) for n, t in base_values.items() if n not in tensors and n not in head)
    delta = delta_of(skeleton, sorted(tensors), tensors=tensors, mode="bitfit", terms={"beft": sorted(beft)},
                     base_model=base, signature=signature, added=added)
    delta.path = str(adapter)
    return delta


def _task_config(adapter, base: str, auto, weights: dict[str, torch.Tensor], transformers, base_config=None):
    """The task model's config: the ``config.json`` in the adapter folder, else the base's (``base_config``, or
    read from the recorded base) with the head size of the adapter's saved head (the rows of its output layer)."""
    if (Path(adapter) / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(str(adapter))
    if base_config is not None:
        config = type(base_config).from_dict(base_config.to_dict())
    else:
        config = _load_base(adapter, transformers.AutoConfig, base)
    skeleton = meta_skeleton(auto, config)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    for name in head_parameter_names(skeleton):
        saved = weights.get(name)
        if saved is not None and name.endswith("weight") and shapes[name][0] == config.num_labels \
                and tuple(saved.shape)[0] != config.num_labels:
            config.num_labels = int(saved.shape[0])
    return config


def _load_base(adapter, cls, base: str, config=None):
    """``cls.from_pretrained(base)`` for the adapter's recorded base (its config, or the base with the task class,
    whose head the adapter brings); a base that cannot be loaded is one line."""
    try:
        if config is None:
            return cls.from_pretrained(base)
        return quietly_from_pretrained(cls, base, config=config)
    except OSError as err:
        raise UsageError(f"{adapter}: its base {base!r} could not be loaded ({first_line(err)[:200]}); pass "
                         "base_model= (a local folder or a hub id), or serve the adapter on a loaded backbone "
                         "(MultiTaskBitFit.add_task).") from None
