"""Quantized bases (bitsandbytes 4-bit and 8-bit): what BitFit trains on them and what it refuses.

A model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (or ``load_in_8bit``) keeps its Linear weights
packed (``Params4bit``: two 4-bit codes per byte plus per-block scales; ``Int8Params``: int8 plus per-row
scales) and everything else (embeddings, norms, biases, the task head) in floating point. Bias-only training
never touches the packed weights: the biases it trains are floating-point tensors beside them, and the biases
it adds are created in the layer's compute dtype. Modes that update weights (``full``, the random
baselines) cannot train packed weights and are refused, as is lean mode (the frozen matrices are already
4/8-bit). bitsandbytes is never imported here: its parameters are told apart by their attributes.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from ..utils.errors import UsageError

#: The extra that installs bitsandbytes.
QUANT_EXTRA = "pip install 'bitfit-tasks[quant]'"


def is_packed(p: torch.Tensor) -> bool:
    """A quantized weight (bitsandbytes' Params4bit / Int8Params, or any integer parameter): not a float."""
    return not (p.is_floating_point() or p.is_complex())


def logical_shape(p: torch.Tensor) -> list[int]:
    """The shape of the matrix a packed 4-bit weight stands for (its storage is ``[n/2, 1]`` bytes)."""
    state = getattr(p, "quant_state", None)
    return list(state.shape) if state is not None and getattr(state, "shape", None) is not None else list(p.shape)


def logical_numel(p: torch.Tensor) -> int:
    """The number of values ``p`` stands for: a packed 4-bit weight holds two per byte."""
    n = 1
    for d in logical_shape(p):
        n *= int(d)
    return n


def packed_kind(p: torch.Tensor) -> str:
    """How a packed weight is stored, e.g. ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``."""
    qtype = getattr(p, "quant_type", None)
    if qtype:
        return f"bnb-{qtype}"
    if p.dtype == torch.int8:
        return "bnb-int8"
    return str(p.dtype).removeprefix("torch.")


def canonical_packed(p: torch.Tensor) -> list[torch.Tensor]:
    """A quantized weight's codes and scales in one layout, whatever bitsandbytes did to it since loading: on a
    CPU with AVX512-BF16 its first inference in eval mode re-lays a 4-bit weight out in place (codes permuted,
    per-block scales de-nested and rounded to bf16). So: the codes in the load's layout, the 4-bit scales as
    bf16 (the nested ones dequantized first); 8-bit: the int8 codes and per-row scales (SCB) as they are."""
    state = getattr(p, "quant_state", None)
    if state is None:
        scb = getattr(p, "SCB", None)
        return [p.detach(), *([scb] if isinstance(scb, torch.Tensor) else [])]
    codes = p.detach()
    if getattr(state, "packing_format_for_cpu", False):
        import copy

        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # Its scales are bf16 already ([K/blocksize, N]); the inverse works on copies (it edits the state).
        codes, _ = _convert_weight_packed_for_cpu_inverse(codes.clone(), copy.deepcopy(state))
        scales = state.absmax.T.reshape(-1)
    elif getattr(state, "nested", False):
        from bitsandbytes.functional import dequantize_blockwise

        scales = dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        scales = state.absmax
    return [codes, scales.float().to(torch.bfloat16)]


def is_quantized_model(model: nn.Module) -> bool:
    """Loaded with a quantization config (transformers' ``hf_quantizer``), or holding packed weights."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return True
    return any(is_packed(p) for p in model.parameters())


def quantization_record(model: nn.Module) -> dict[str, Any] | None:
    """What a delta and results.json record of a quantized base: the method, bits, 4-bit type, compute dtype,
    double quantization, and the modules left unquantized. None for a full-precision model."""
    if not is_quantized_model(model):
        return None
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    bits = 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None
    method = qc.get("quant_method", "unknown")
    record: dict[str, Any] = {"method": str(getattr(method, "value", method)), "bits": bits}
    if bits == 4:
        record.update(quant_type=qc.get("bnb_4bit_quant_type"), compute_dtype=str(qc.get("bnb_4bit_compute_dtype")),
                      double_quant=bool(qc.get("bnb_4bit_use_double_quant")))
    record["packed_tensors"] = sum(1 for p in model.parameters() if is_packed(p))
    return record


def describe_quantization(record: dict[str, Any] | None) -> str:
    if not record:
        return "full precision"
    if record.get("bits") == 4:
        nested = ", double quantization" if record.get("double_quant") else ""
        compute = record.get("compute_dtype")
        return f"{record.get('method')} 4-bit {record.get('quant_type')} (compute {compute}{nested})"
    return f"{record.get('method')} {record.get('bits')}-bit"


def bnb_config_text(record: dict[str, Any] | None, skip: list[str] | None = None) -> str | None:
    """The ``BitsAndBytesConfig(...)`` that loads a base the way ``record`` (:func:`quantization_record`) says, as
    Python source for messages and model cards (bitsandbytes' own default 4-bit type is fp4, not the nf4 QLoRA and
    the runners use, so it is always spelled out)."""
    if not record or record.get("method") != "bitsandbytes" or record.get("bits") not in (4, 8):
        return None
    if record["bits"] == 8:
        args = ["load_in_8bit=True"]
    else:
        args = ["load_in_4bit=True", f"bnb_4bit_quant_type={record.get('quant_type')!r}"]
        if record.get("compute_dtype") not in (None, "None"):
            args.append(f"bnb_4bit_compute_dtype=torch.{record['compute_dtype']}")
        if record.get("double_quant"):
            args.append("bnb_4bit_use_double_quant=True")
    if skip:
        args.append(f"llm_int8_skip_modules={skip}")
    return f"BitsAndBytesConfig({', '.join(args)})"


def is_bnb_layer(module: nn.Module) -> bool:
    """A bitsandbytes layer (Linear4bit, Linear8bitLt), told by where its class lives."""
    return type(module).__module__.startswith("bitsandbytes")


def new_bias_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a bias BitFit adds to ``module``: its weight's; fp32 beside a packed weight (never the packed
    storage dtype), where :func:`float_biases_outside` adds it after the layer's product."""
    weight = getattr(module, "weight", None)
    if weight is not None and not is_packed(weight):
        return weight.dtype
    return torch.float32


def _forward_bias_outside(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A bitsandbytes layer's forward with its bias held back and added to the output, in the output's dtype."""
    bias = self._parameters["bias"]
    self._parameters["bias"] = None
    try:
        out = type(self).forward(self, x, *args, **kwargs)
    finally:
        self._parameters["bias"] = bias
    return out if bias is None else out + bias.to(out.dtype)


@torch.no_grad()
def float_biases_outside(model: nn.Module, names) -> list[str]:
    """Give each named bias of a bitsandbytes layer an fp32 home outside bitsandbytes; returns the names moved.

    bitsandbytes casts a layer's bias to its compute dtype *in place* at every forward. A bf16 bias that AdamW
    updates has no fp32 master copy, so updates below half a bf16 step are lost (measured: 1 of 32 entries moved
    in 4 steps at lr 1e-4); and a delta would be saved in one dtype and re-applied in another. So the bias is kept
    as an fp32 parameter (same name, same value) and added to the layer's output, in the output's dtype, the way
    PEFT's BEFT adds its bias vectors; with fp32 compute the result is the same.
    """
    moved = []
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            continue
        bias = module._parameters.get("bias") if attr == "bias" else None
        if bias is None or not is_bnb_layer(module):
            continue
        if bias.dtype != torch.float32:
            module._parameters["bias"] = nn.Parameter(bias.detach().float(), requires_grad=bias.requires_grad)
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(_forward_bias_outside, module)
        moved.append(name)
    return moved


def keep_trainable_layout(model: nn.Module) -> int:
    """Stop bitsandbytes re-laying 4-bit weights out for CPU inference, on a model that trains; returns how many
    layers were told. On a CPU with AVX512-BF16, a Linear4bit's first forward in eval mode without gradients
    (an evaluation) repacks its weight in place for a faster kernel, and every later forward takes that kernel,
    training ones included: it adds the bias in place (a training step then fails: "a view of a leaf Variable
    that requires grad is being used in an in-place operation") and passes no gradient to its input (adapters
    and biases below it would silently stop learning). A weight repacked already is put back in the load's
    layout first, as bitsandbytes does before saving."""
    told = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        told += 1
    return told


def module_paths(names: list[str]) -> list[str]:
    """The modules that own the named parameters (``classifier.weight`` -> ``classifier``), in order."""
    return list(dict.fromkeys(n.rpartition(".")[0] for n in names))


def quantized_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Which modules owning ``names`` bitsandbytes replaced (Linear4bit, Linear8bitLt)."""
    out = []
    for path in module_paths(names):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if is_bnb_layer(module):
            out.append(path)
    return out


def check_quantized_mode(model: nn.Module, mode: str, *, lean: bool = False, head: list[str] = ()) -> None:
    """A quantized base trains in the bias-only modes only (its packed weights never change), one line
    otherwise; a quantization method that cannot back-propagate is refused too, and so is a task head that
    was quantized (``head``: its parameter names): it is trained and newly initialised, so it must stay a
    floating-point layer."""
    if not is_quantized_model(model):
        return
    what = describe_quantization(quantization_record(model))
    packed_head = quantized_modules(model, list(head))
    if packed_head:
        raise UsageError(f"the task head {packed_head} was quantized with the base ({what}); a head is new and "
                         "trained, so it must stay floating point: load with BitsAndBytesConfig(..., "
                         f"llm_int8_skip_modules={packed_head}) (transformers leaves only the last module and the "
                         "output embeddings unquantized by default; the runners skip the head themselves).")
    if mode in ("rand_uniform", "rand_row_col"):
        raise UsageError(f"mode {mode!r} trains randomly drawn backbone weights, and this base is quantized ({what}): "
                         "its weights are packed 4/8-bit codes that cannot be trained entry by entry. Load the base "
                         "in full precision for the random baselines, or use --mode bitfit.")
    if lean:
        raise UsageError(f"lean mode stores the frozen weights in bf16, and this base is quantized ({what}): its "
                         "matrices are already 4/8-bit. Drop --lean (for bf16 compute, load with "
                         "bnb_4bit_compute_dtype=torch.bfloat16, or pass --bf16 true to the runners).")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_trainable", True):
        raise UsageError(f"this base is quantized with {what}, which transformers cannot back-propagate through; "
                         "BitFit needs gradients through the frozen layers to train their biases. Load it with "
                         f"bitsandbytes (BitsAndBytesConfig(load_in_4bit=True); {QUANT_EXTRA}) or in full precision.")
    if hasattr(model, "_orig_mod"):
        raise UsageError("a quantized model compiled with torch.compile() cannot be fine-tuned (transformers refuses "
                         "it); pass the model before torch.compile, or set --torch_compile false.")


__all__ = ["QUANT_EXTRA", "bnb_config_text", "check_quantized_mode", "describe_quantization",
           "float_biases_outside", "is_bnb_layer", "is_packed", "is_quantized_model", "keep_trainable_layout",
           "logical_numel", "logical_shape", "module_paths", "new_bias_dtype", "quantization_record",
           "quantized_modules"]
