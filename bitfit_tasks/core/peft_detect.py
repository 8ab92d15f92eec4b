"""Telling a PEFT model apart by its modules' classes, so the core needs neither peft installed nor the
PEFT interop imported: whether PEFT wrapped a model, and the head copies it trains (``modules_to_save``)."""

from __future__ import annotations

from torch import nn

# PEFT's wrapper of a module trained and saved whole (the task head under modules_to_save).
_SAVED_WHOLE = "ModulesToSaveWrapper"


def is_peft_model(model: nn.Module) -> bool:
    """Whether PEFT has wrapped ``model`` or injected adapter layers into it (checked by the modules'
    classes, so peft need not be installed or imported)."""
    return any(type(m).__module__.split(".")[0] == "peft" for m in model.modules())


def is_saved_whole(module: nn.Module) -> bool:
    return type(module).__name__ == _SAVED_WHOLE


def peft_head_names(model: nn.Module) -> list[str]:
    """Names of the trainable copies PEFT keeps of the head (``<head>.modules_to_save.default.*``)."""
    names = []
    for mod_name, module in model.named_modules():
        if is_saved_whole(module):
            names += [f"{mod_name}.modules_to_save.{n}" for n, _ in module.modules_to_save.named_parameters()]
    return names
