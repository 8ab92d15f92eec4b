"""Merging a delta into a standard full model (the ``export`` command of ``bitfit-delta``): a delta that added biases to
a bias-free base merges by switching on the config's own flags, or is refused in one line."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from ..core.bias_maps import bias_map_for
from ..core.skeleton import meta_skeleton
from ..utils.errors import UsageError
from ..utils.fileio import check_new_folder, publish_folder
from .apply import load_task_model, task_model_class
from .format import Delta


def flags_for_added_biases(config, delta: Delta) -> dict[str, bool]:
    """The config flags (``attention_bias``, ``mlp_bias``, ``norm_bias``, from the family's bias map) that
    make a standard model of ``config``'s class hold every bias the delta added; refused in one line
    when the config cannot express some (Mistral has no such flag, Qwen3 none for its MLP)."""
    added = set(delta.meta.get("added_biases") or {})
    cls = task_model_class(delta.meta["task_class"])
    task_cfg = delta.meta.get("task_config") or {}
    bmap = bias_map_for(config.model_type)
    base_names = {n for n, _ in meta_skeleton(cls, type(config).from_dict({**config.to_dict(), **task_cfg}))
                  .named_parameters()}
    flags: dict[str, bool] = {}
    covered: set[str] = set()
    for flag in (bmap.config_flags if bmap is not None else ()):
        if getattr(config, flag, None) is not False:
            continue
        on = type(config).from_dict({**config.to_dict(), **task_cfg, flag: True})
        new = {n for n, _ in meta_skeleton(cls, on).named_parameters()} - base_names
        if new & added:
            flags[flag] = True
            covered |= new
    left = sorted(added - covered)
    if left:
        terms = sorted(t for t, names in delta.meta.get("terms", {}).items() if set(names) & set(left))
        flags = list(bmap.config_flags) if bmap else []
        have = f"its flags {flags} cover the others" if flags else "it has no flag that adds biases"
        retrain = " or train with --bias_terms limited to the terms those flags cover" if flags else ""
        raise UsageError(
            f"cannot merge: {type(config).__name__} cannot express the biases this delta added for term(s) {terms} "
            f"(e.g. {left[0]}; {have}), so a merged model would lose them. Serve the delta on its base instead "
            f"(load_task_model(base, delta), MultiTaskBitFit, or bitfit-delta export-peft for PEFT){retrain}.")
    return flags


@torch.no_grad()
def with_config_flags(model: nn.Module, flags: dict[str, bool]) -> nn.Module:
    """``model`` rebuilt as its own class with ``flags`` switched on in its config, holding the same tensors;
    the biases a flag builds that the delta did not train are zeros (their value in the delta's model)."""
    config = copy.deepcopy(model.config)
    for flag, value in flags.items():
        setattr(config, flag, value)
    merged = meta_skeleton(type(model), config)
    state = model.state_dict()
    for name, t in merged.state_dict().items():
        if name not in state:
            if not name.endswith(".bias"):
                raise UsageError(f"cannot merge: config flags {sorted(flags)} add {name}, which is not a bias.")
            state[name] = torch.zeros(t.shape, dtype=next(model.parameters()).dtype)
    merged.load_state_dict(state, strict=True, assign=True)
    return merged.eval()


def export_merged(base_model: str, delta_dir: str | os.PathLike | Delta, output_dir: str | os.PathLike) -> Path:
    """Write a full ``from_pretrained``-loadable model (base + delta merged), plus the tokenizer.
    A delta that added biases to a base built without them (Llama, ModernBERT, ...) merges by
    switching on the config's own flags (``attention_bias``, ``mlp_bias``, ``norm_bias``); where the
    config cannot express them, the merge is refused in one line. The folder is built under a
    temporary name and renamed, and an existing file or non-empty folder at ``output_dir`` is
    refused, never overwritten."""

    from transformers import AutoTokenizer

    out = Path(output_dir)
    check_new_folder(out, "merged model")
    delta = Delta.from_pretrained(delta_dir) if not isinstance(delta_dir, Delta) else delta_dir
    delta_dir = delta.path
    if delta.meta.get("added_biases"):
        # Refused before the base is loaded: which config flags would build the added biases.
        config = transformers.AutoConfig.from_pretrained(base_model)
        flags = flags_for_added_biases(config, delta)
    model = load_task_model(base_model, delta)
    if delta.meta.get("added_biases"):
        model = with_config_flags(model, flags)
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(delta_dir if (Path(delta_dir) / "tokenizer_config.json").exists()
                                          else base_model).save_pretrained(tmp)
        except (OSError, ValueError):  # a base without a tokenizer: the weights are what matters
            pass

    return publish_folder(out, write)
