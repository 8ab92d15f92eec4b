"""Many tasks on one backbone: each task is a bias delta plus a head; the backbone is loaded once.

    mt = MultiTaskBitFit(AutoModel.from_pretrained(base))
    mt.add_task("rte", "runs/rte")            # a folder written by BitFitTrainer.save_model()
    mt.add_task("sst2", "runs/sst2")
    mt("rte", **batch).logits                  # switches biases in place (microseconds), runs the task
    mt.forward_mixed(["rte", "sst2", ...], **batch)  # one backbone pass, each row its own task

Switching copies a few thousand bias values into the shared backbone. The mixed pass keeps the
backbone at its pretrained biases and adds, per row, ``b_task - b_base`` to the output of every
Linear/LayerNorm a task changed (both add their bias last, so the sum is that row's own bias),
then runs each task's head on its rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.prepare import add_biases
from ..core.quantized import float_biases_outside, is_quantized_model, keep_trainable_layout, logical_shape
from ..core.signature import base_mismatch
from ..core.skeleton import meta_skeleton
from ..delta.apply import task_model_class
from ..delta.format import Delta

logger = logging.getLogger("bitfit_tasks")


class _Precomputed(nn.Module):
    """Stands in for the backbone inside a task model: returns outputs computed beforehand."""

    def __init__(self, outputs: Any) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, *args, **kwargs):
        return self.outputs


def _slice_output(out: Any, rows: torch.Tensor) -> Any:
    return type(out)(**{k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in out.items()})


class _TensorBank(nn.Module):
    """Named tensors as registered buffers (``.to()`` moves them, ``state_dict()`` holds them); buffer
    names cannot contain '.', so the backbone names are stored with '.' -> '__'."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self._keys: dict[str, str] = {}  # backbone name -> buffer name
        for name, value in (tensors or {}).items():
            self.set(name, value)

    def set(self, name: str, value: torch.Tensor) -> None:
        self._keys[name] = name.replace(".", "__")
        self.register_buffer(self._keys[name], value.detach().clone())

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self._buffers[self._keys[name]] if name in self._keys else default

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, self._buffers[key]) for name, key in self._keys.items()]

    def names(self) -> list[str]:
        return list(self._keys)


def _head_modules(skeleton: nn.Module, prefix: str) -> nn.Module:
    """The task model's modules other than its backbone, as children of one module: the same objects,
    so moving or loading them changes the task model too."""
    heads = nn.Module()
    for child_name, child in skeleton.named_children():
        if child_name != prefix:
            heads.add_module(child_name, child)
    return heads


class MultiTaskBitFit(nn.Module):
    """A real ``nn.Module``: the shared backbone, every task's head (``heads``, a ``ModuleDict``) and
    every task's biases and the pristine base values (``task_biases`` / ``base_values``, registered
    buffers) move together with ``.to(device)`` / ``.to(dtype)`` and round-trip through
    ``state_dict()``; switching tasks copies device tensors into the backbone, nothing from the host.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        # Accept a task model too: keep only its backbone.
        self.backbone = getattr(backbone, "base_model", backbone).eval()
        self.heads = nn.ModuleDict()
        self.task_biases = nn.ModuleDict()  # task -> _TensorBank of backbone-relative name -> value
        self.base_values = _TensorBank()  # pristine values of every overridden tensor
        # The task models (head + a slot for the shared backbone) are not submodules: their head
        # modules are registered once, under ``heads``; the backbone once, as ``backbone``.
        self._task_models: dict[str, nn.Module] = {}
        self._prefixes: dict[str, str] = {}
        self.active: str | None = None
        # A loaded state_dict holds the backbone as the saving module had it (perhaps with another
        # task's biases in place): start again from the loaded base values, no task active.
        self.register_load_state_dict_post_hook(_deactivate_after_load)

    @property
    def tasks(self) -> dict[str, nn.Module]:
        """Task name -> its model (shares ``backbone``)."""
        return dict(self._task_models)

    # ---- registry ----------------------------------------------------------------------------

    def add_task(self, name: str, delta: Delta | str | os.PathLike, *, verify_fingerprint: bool = True) -> None:
        """Serve ``delta`` (a :class:`Delta`, a delta folder, or a PEFT BEFT adapter folder) as task ``name``.
        Everything is checked before anything is registered: a refused task leaves the module as it was."""
        self._check_task_name(name)
        if not isinstance(delta, Delta):
            from ..peft_interop.convert import delta_from_peft, is_peft_adapter_dir

            if is_peft_adapter_dir(delta):
                # Its base values come from the backbone held here, its pristine values (not the active task's),
                # never from a second copy of the base.
                pristine = {n: self.base_values.get(n, p) for n, p in self.backbone.named_parameters()}
                delta = delta_from_peft(delta, backbone=pristine, base_config=self.backbone.config)
                if verify_fingerprint:
                    self._note_adapter_base(name, delta)
            else:
                delta = Delta.load(delta)
        cls = task_model_class(delta.meta["task_class"], source=str(delta.path or "the delta"))
        mine, theirs = getattr(self.backbone.config, "model_type", None), delta.meta.get("model_type")
        if theirs is not None and mine is not None and theirs != mine:
            raise ValueError(f"task {name!r}: delta {delta.path or ''} was trained on a {theirs!r} model; this "
                             f"backbone is {mine!r}. Serve it on a {theirs} backbone (its base: "
                             f"{delta.meta.get('base_model')!r}).")
        config = type(self.backbone.config).from_dict(delta.meta["task_config"])
        skeleton = meta_skeleton(cls, config)  # its backbone is replaced by the shared one
        prefix = skeleton.base_model_prefix
        expected = {n: list(p.shape) for n, p in getattr(skeleton, prefix).named_parameters()}
        shared = dict(self.backbone.named_parameters())
        # A quantized backbone's packed weights are compared by the shape of the matrix they stand for.
        missing = [n for n in expected if n not in shared or logical_shape(shared[n]) != expected[n]]
        if missing:
            raise ValueError(f"task {name!r} ({delta.meta['task_class']}) expects backbone tensors this "
                             f"backbone lacks or shapes differently, e.g. {missing[:3]}.")
        rel = {n[len(prefix) + 1:]: t for n, t in delta.tensors.items() if n.startswith(prefix + ".")}
        if verify_fingerprint:
            # The pristine base, not the live backbone: it holds the active task's biases.
            pristine = [(f"{prefix}.{n}", self.base_values.get(n, shared[n])) for n in expected if n not in rel]
            why = base_mismatch(delta.meta, pristine)
            if why is not None:
                raise ValueError(f"task {name!r}: delta {delta.path} was trained on a different base model "
                                 f"({delta.meta.get('base_model')!r}; {why}); refusing to apply it to this backbone.")
        setattr(skeleton, prefix, self.backbone)
        ref = next(self.backbone.parameters())  # the head lives where the backbone does, in its dtype
        head = {n: t for n, t in delta.tensors.items() if not n.startswith(prefix + ".")}
        for full, value in head.items():
            mod_name, _, attr = full.rpartition(".")
            mod = skeleton.get_submodule(mod_name)
            setattr(mod, attr, nn.Parameter(value.to(ref.device, ref.dtype), requires_grad=False))
        leftover = [n for n, p in skeleton.named_parameters() if p.is_meta]
        if leftover:
            raise ValueError(f"task {name!r}: the delta lacks head tensors {leftover[:3]}.")
        # Biases the delta added to a base built without them: zero biases on the shared backbone (its
        # outputs unchanged), so switching and mixed batches treat them as any other bias. All or nothing.
        add_biases(self.backbone, {n[len(prefix) + 1:]: v for n, v in delta.meta.get("added_biases", {}).items()
                                   if n.startswith(prefix + ".")})
        if is_quantized_model(self.backbone):  # computes as the trained model did (see apply_delta)
            float_biases_outside(self.backbone, list(rel))
            keep_trainable_layout(self.backbone)
        shared = dict(self.backbone.named_parameters())
        biases = _TensorBank({n: t.to(shared[n].device, shared[n].dtype) for n, t in rel.items()})
        # Checked: from here on nothing fails, so the task is registered whole or not at all.
        for n in rel:
            if n not in self.base_values:  # no task changed it yet: the live value is the base's
                self.base_values.set(n, shared[n])
        self._task_models[name] = skeleton.eval()
        self._prefixes[name] = prefix
        self.heads[name] = _head_modules(skeleton, prefix)
        self.task_biases[name] = biases

    def _note_adapter_base(self, name: str, delta: Delta) -> None:
        """A PEFT adapter records its base by name only, so no signature check can refuse another base of the
        same shapes: say so where the recorded name is not this backbone's."""
        recorded, mine = delta.meta.get("base_model"), getattr(self.backbone.config, "_name_or_path", None)
        if recorded and mine and os.path.normpath(str(recorded)) != os.path.normpath(str(mine)):
            logger.warning("task %r: the PEFT adapter %s names its base %r, and this backbone was loaded from %r; an "
                           "adapter holds no fingerprint of its base, so only its shapes were checked: serve it on the "
                           "base it was trained on.", name, delta.path, recorded, mine)

    def _check_task_name(self, name: str) -> None:
        """A task name keys ``heads`` and ``task_biases`` (``ModuleDict``s): no '.', not empty, not
        one of ModuleDict's own attributes; checked before anything changes."""
        if name in self._task_models:
            raise ValueError(f"task {name!r} is loaded already; remove_task({name!r}) first.")
        if not isinstance(name, str) or not name or "." in name or hasattr(self.heads, name):
            raise ValueError(f"task name {name!r} cannot be used: it keys the module's state_dict, so it must be a "
                             "non-empty string without '.' and not a ModuleDict attribute (e.g. 'keys'); name it "
                             "e.g. 'rte' or 'sst2_v2'.")

    def remove_task(self, name: str) -> None:
        self._require(name)
        if self.active == name:
            self.deactivate()
        del self._task_models[name], self._prefixes[name], self.heads[name], self.task_biases[name]

    def _require(self, name: str) -> None:
        if name not in self._task_models:
            raise KeyError(f"unknown task {name!r}; loaded tasks: {sorted(self._task_models)}.")

    # ---- one task at a time --------------------------------------------------------------------

    @torch.no_grad()
    def deactivate(self) -> None:
        """Put the pristine base values back (bit-exact)."""
        params = dict(self.backbone.named_parameters())
        for n, value in self.base_values.items():
            params[n].copy_(value)
        self.active = None

    @torch.no_grad()
    def activate(self, name: str) -> nn.Module:
        """Switch the shared backbone to ``name``'s biases; returns that task's model."""
        self._require(name)
        if self.active != name:
            self.deactivate()
            params = dict(self.backbone.named_parameters())
            for n, value in self.task_biases[name].items():
                params[n].copy_(value)  # device to device: the bank moved with the module
            self.active = name
        return self._task_models[name]

    @torch.no_grad()
    def forward(self, task: str, **inputs):
        return self.activate(task)(**inputs)

    # ---- mixed batches -------------------------------------------------------------------------

    @torch.no_grad()
    def forward_mixed(self, row_tasks: Sequence[str], **inputs) -> list[dict[str, torch.Tensor]]:
        """One backbone pass over a batch whose row i belongs to task ``row_tasks[i]``.

        Returns, per row, that task's outputs (e.g. ``{"logits": tensor}``).
        """
        batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
        if len(row_tasks) != batch:
            raise ValueError(f"row_tasks has {len(row_tasks)} entries for a batch of {batch} rows.")
        names = list(dict.fromkeys(row_tasks))
        for n in names:
            self._require(n)
        device = next(self.backbone.parameters()).device
        task_index = torch.tensor([names.index(t) for t in row_tasks], device=device)
        self.deactivate()
        modules = dict(self.backbone.named_modules())
        hooks = []
        try:
            for tensor_name in sorted({n for t in names for n in self.task_biases[t].names()}):
                mod_name, _, attr = tensor_name.rpartition(".")
                mod = modules[mod_name]
                if attr != "bias" or not isinstance(mod, nn.Linear | nn.LayerNorm):
                    raise ValueError(f"mixed-task batches need bias-only deltas on Linear/LayerNorm; "
                                     f"{tensor_name} ({type(mod).__name__}) is not one. Use activate().")
                base = self.base_values.get(tensor_name)
                offsets = torch.stack([self.task_biases[t].get(tensor_name, base) - base for t in names])
                hooks.append(mod.register_forward_hook(_row_bias_hook(offsets, task_index, tensor_name)))
            out = self.backbone(**inputs)
        finally:
            for h in hooks:
                h.remove()
        results: list[dict[str, torch.Tensor]] = [{} for _ in range(batch)]
        for i, name in enumerate(names):
            rows = (task_index == i).nonzero().flatten()
            model = self._task_models[name]
            prefix = model.base_model_prefix
            row_inputs = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in inputs.items()}
            setattr(model, prefix, _Precomputed(_slice_output(out, rows)))
            try:
                task_out = model(**row_inputs)
            finally:
                setattr(model, prefix, self.backbone)
            for j, r in enumerate(rows.tolist()):
                results[r] = {k: v[j] for k, v in task_out.items() if torch.is_tensor(v) and v.dim() > 0}
        return results


def _deactivate_after_load(module: MultiTaskBitFit, incompatible_keys: Any) -> None:
    module.deactivate()


def _row_bias_hook(offsets: torch.Tensor, task_index: torch.Tensor, name: str):
    def hook(module, args, output):
        if output.shape[0] != task_index.numel():
            raise ValueError(f"{name}: its output has no batch dimension first ({tuple(output.shape)}); "
                             "such a bias cannot differ per row. Use activate() for this task.")
        per_row = offsets.to(output.dtype)[task_index]
        return output + per_row.view(per_row.shape[0], *([1] * (output.dim() - 2)), per_row.shape[-1])

    return hook
