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

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .delta import Delta, fingerprint_tensors


class _Precomputed(nn.Module):
    """Stands in for the backbone inside a task model: returns outputs computed beforehand."""

    def __init__(self, outputs: Any) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, *args, **kwargs):
        return self.outputs


def _slice_output(out: Any, rows: torch.Tensor) -> Any:
    return type(out)(**{k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in out.items()})


class MultiTaskBitFit(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        # Accept a task model too: keep only its backbone.
        self.backbone = getattr(backbone, "base_model", backbone).eval()
        self.tasks: dict[str, nn.Module] = {}
        self.task_biases: dict[str, dict[str, torch.Tensor]] = {}  # backbone-relative name -> value
        self._base: dict[str, torch.Tensor] = {}  # pristine values of every overridden tensor
        self.active: str | None = None

    # ---- registry ----------------------------------------------------------------------------

    def add_task(self, name: str, delta: Delta | str | os.PathLike, *, verify_fingerprint: bool = True) -> None:
        import transformers

        if name in self.tasks:
            raise ValueError(f"task {name!r} is loaded already; remove_task({name!r}) first.")
        delta = delta if isinstance(delta, Delta) else Delta.load(delta)
        cls = getattr(transformers, delta.meta["task_class"])
        config = type(self.backbone.config).from_dict(delta.meta["task_config"])
        with torch.device("meta"):  # the skeleton only: its backbone is replaced by the shared one
            skeleton = cls(config)
        prefix = skeleton.base_model_prefix
        expected = {n: p.shape for n, p in getattr(skeleton, prefix).named_parameters()}
        shared = dict(self.backbone.named_parameters())
        missing = [n for n in expected if n not in shared or shared[n].shape != expected[n]]
        if missing:
            raise ValueError(f"task {name!r} ({delta.meta['task_class']}) expects backbone tensors this "
                             f"backbone lacks or shapes differently, e.g. {missing[:3]}.")
        rel = {n[len(prefix) + 1:]: t for n, t in delta.tensors.items() if n.startswith(prefix + ".")}
        if verify_fingerprint:
            got = fingerprint_tensors((f"{prefix}.{n}", shared[n]) for n in expected if n not in rel)
            if got != delta.meta.get("base_fingerprint"):
                raise ValueError(f"task {name!r}: delta {delta.path} was trained on a different base model "
                                 f"({delta.meta.get('base_model')!r}); refusing to apply it to this backbone.")
        setattr(skeleton, prefix, self.backbone)
        head = {n: t for n, t in delta.tensors.items() if not n.startswith(prefix + ".")}
        for full, value in head.items():
            mod_name, _, attr = full.rpartition(".")
            mod = skeleton.get_submodule(mod_name)
            setattr(mod, attr, nn.Parameter(value.clone(), requires_grad=False))
        leftover = [n for n, p in skeleton.named_parameters() if p.is_meta]
        if leftover:
            raise ValueError(f"task {name!r}: the delta lacks head tensors {leftover[:3]}.")
        for n in rel:
            self._base.setdefault(n, shared[n].detach().clone())
        self.tasks[name] = skeleton.eval()
        self.task_biases[name] = rel

    def remove_task(self, name: str) -> None:
        self._require(name)
        if self.active == name:
            self.deactivate()
        del self.tasks[name], self.task_biases[name]

    def _require(self, name: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; loaded tasks: {sorted(self.tasks)}.")

    # ---- one task at a time --------------------------------------------------------------------

    @torch.no_grad()
    def deactivate(self) -> None:
        """Put the pristine base values back (bit-exact)."""
        params = dict(self.backbone.named_parameters())
        for n, value in self._base.items():
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
                params[n].copy_(value.to(params[n].device, params[n].dtype))
            self.active = name
        return self.tasks[name]

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
        task_index = torch.tensor([names.index(t) for t in row_tasks])
        self.deactivate()
        modules = dict(self.backbone.named_modules())
        hooks = []
        try:
            for tensor_name in sorted({n for t in names for n in self.task_biases[t]}):
                mod_name, _, attr = tensor_name.rpartition(".")
                mod = modules[mod_name]
                if attr != "bias" or not isinstance(mod, nn.Linear | nn.LayerNorm):
                    raise ValueError(f"mixed-task batches need bias-only deltas on Linear/LayerNorm; "
                                     f"{tensor_name} ({type(mod).__name__}) is not one. Use activate().")
                base = self._base[tensor_name]
                offsets = torch.stack([self.task_biases[t].get(tensor_name, base).to(base) - base
                                       for t in names])
                hooks.append(mod.register_forward_hook(_row_bias_hook(offsets, task_index, tensor_name)))
            out = self.backbone(**inputs)
        finally:
            for h in hooks:
                h.remove()
        results: list[dict[str, torch.Tensor]] = [{} for _ in range(batch)]
        for i, name in enumerate(names):
            rows = (task_index == i).nonzero().flatten()
            model = self.tasks[name]
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


def _row_bias_hook(offsets: torch.Tensor, task_index: torch.Tensor, name: str):
    def hook(module, args, output):
        if output.shape[0] != task_index.numel():
            raise ValueError(f"{name}: its output has no batch dimension first ({tuple(output.shape)}); "
                             "such a bias cannot differ per row. Use activate() for this task.")
        per_row = offsets.to(output.device, output.dtype)[task_index.to(output.device)]
        return output + per_row.view(per_row.shape[0], *([1] * (output.dim() - 2)), per_row.shape[-1])

    return hook
