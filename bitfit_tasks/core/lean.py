"""Lean bias-only training: frozen weights stored once in bf16, bf16 autocast, 1-byte dropout masks.

Only a bias-only method can store its frozen weights in bf16 for good: they never update, so there
is no fp32 master copy to keep. Biases, LayerNorm gains and the head stay fp32 (the optimizer
updates fp32 values; autocast casts them per op). Frozen weights are rounded to bf16 once, so the
forward pass differs from fp32 training by bf16 rounding, the same order as bf16 autocast alone.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch
from torch import nn

from ..utils.errors import UsageError


class _BoolDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand_like(x, dtype=torch.float32) >= p  # bool: 1 byte per element, saved for backward
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class BoolDropout(nn.Dropout):
    """``nn.Dropout`` that keeps its mask as bool for backward (PyTorch's CPU dropout keeps a mask
    the size and dtype of the activation). Same distribution, same expectation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        return _BoolDropoutFn.apply(x, self.p)


def cpu_bf16_capability() -> dict[str, bool]:
    """What this CPU offers bf16 matmuls (torch's own checks): AVX512-BF16 or AMX tiles run them
    natively; without either oneDNN emulates them, >50x slower than fp32 on an AVX2-only CPU."""
    return {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx": bool(torch.cpu._is_amx_tile_supported())}


def bf16_supported(device: str = "cuda") -> bool:
    """Whether bf16 autocast is *fast* on ``device``. An accelerator: accelerate's own check
    (``is_bf16_available``, the one Trainer's ``--bf16`` goes through). A CPU: accelerate answers
    True for every CPU, since bf16 *runs* everywhere, so torch's checks for native bf16 matmuls
    (AVX512-BF16 or AMX) decide."""
    if device != "cpu":
        from accelerate.utils import is_bf16_available

        return bool(is_bf16_available(ignore_tpu=True))
    return any(cpu_bf16_capability().values())


def accelerator_type(args) -> str:
    """The device type training will run on: 'cpu' under ``--use_cpu``, else torch's current
    accelerator (cuda, xpu, mps, npu, ...), else 'cpu'."""
    if args.use_cpu:
        return "cpu"
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator().type
    return "cuda" if torch.cuda.is_available() else "cpu"


def lean_runs(args) -> bool:
    """Whether a run asked for lean mode with these ``TrainingArguments`` really runs lean: refused in
    one line with --fp16 or on an accelerator without bf16; False, with a warning, on a CPU without
    native bf16 matmuls (the run trains in fp32, and its results.json says so)."""
    if args.fp16:
        raise UsageError("lean=True trains under bf16 autocast; it cannot be combined with --fp16 (fp16 "
                         "autocast). Drop --fp16 (lean sets bf16 itself), or drop --lean.")
    device = accelerator_type(args)
    if bf16_supported(device):
        return True
    if device != "cpu":
        raise UsageError(f"lean=True needs bf16 autocast, which this {device} device does not support; "
                         "drop --lean.")
    # Without native bf16 matmuls oneDNN emulates them: a lean step measured >50x slower than fp32 on
    # an AVX2-only CPU. Train in fp32 instead and say so.
    warnings.warn(f"--lean needs native bf16 matmuls (AVX512-BF16 or AMX); this CPU has none "
                  f"({cpu_bf16_capability()}), where bf16 is emulated and >50x slower, so this run "
                  "trains in fp32 (plain BitFit). Drop --lean to silence this.", UserWarning, stacklevel=3)
    return False


def _autocast_forward(model: nn.Module) -> None:
    """Run every forward of ``model`` under bf16 autocast on whatever device it sits on, so
    training, evaluation and plain calls all work with the bf16 weights. The wrapper is a method
    bound to the model (not a closure over it), so ``copy.deepcopy`` binds the copy's wrapper to
    the copy."""
    if getattr(model, "_bitfit_lean_forward", False):
        return
    own = model.__dict__.get("forward")  # a forward already patched on this instance, else the class's
    if own is None:
        inner = type(model).forward
    elif isinstance(own, types.MethodType) and own.__self__ is model:
        inner = own.__func__
    else:  # another library's closure: kept (a copy of the model shares it, as it did before)
        def inner(self, *args, **kwargs):
            return own(*args, **kwargs)

        functools.update_wrapper(inner, own)

    @functools.wraps(inner)  # keeps the signature Trainer reads to choose dataset columns
    def forward(self, *args, **kwargs):
        device = next(self.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            return inner(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._bitfit_lean_forward = True


@torch.no_grad()
def make_lean(model: nn.Module) -> dict[str, int]:
    """Cast every frozen parameter with >= 2 dims (weight matrices, embeddings) to bf16 in place, run
    the model's forward under bf16 autocast, and swap ``nn.Dropout`` modules for
    :class:`BoolDropout`. Returns what it changed."""
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and p.dim() >= 2 and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            cast += p.numel()
    _autocast_forward(model)
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, BoolDropout(child.p, child.inplace))
                swapped += 1
    return {"bf16_frozen_values": cast, "bool_dropouts": swapped}
