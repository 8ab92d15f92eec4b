"""Apply a training mode to a model: freeze, select, and (for the random baselines) mask."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..utils.errors import UsageError
from .config import PEFT_MODES, BitFitConfig
from .peft_detect import is_peft_model, peft_head_names
from .quantized import (
    check_quantized_mode,
    float_biases_outside,
    keep_trainable_layout,
    logical_numel,
    new_bias_dtype,
)
from .selection import (
    ADDABLE_BIAS_TYPES,
    BiasMap,
    backbone_of,
    bias_parameter_ids,
    bias_size,
    head_parameter_names,
    lm_head_parameter_names,
    plan_bias_selection,
)

logger = logging.getLogger("bitfit_tasks")


@dataclass
class BitFitState:
    """What :func:`prepare_model` decided, kept by the trainer for the optimizer and logging."""

    mode: str
    terms: dict[str, list[str]]
    head: list[str]
    trainable: list[str]
    n_trainable: int
    n_total: int
    # Tensors trained in part, one mechanism for both kinds: the random baselines' chosen entries, and the slices
    # of a fused q/k/v bias that q, k or v alone select. Which entries may change, and the values the others keep.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    term_counts: dict[str, int] = field(default_factory=dict)
    #: Every head tensor, trained or not (a delta stores the head either way).
    head_all: list[str] = field(default_factory=list)
    #: Biases BitFit added (zero-initialised) where the model had none: full name -> length.
    added: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        pct = 100.0 * self.n_trainable / max(self.n_total, 1)
        lines = [
            f"trainable params: {self.n_trainable:,d} || all params: {self.n_total:,d} "
            f"|| trainable%: {pct:.4f}"
        ]
        added_terms = {t for t, names in self.terms.items() if any(n in self.added for n in names)}
        order = ("q", "k", "v", "qkv", "m1", "LN1", "m2", "m3", "LN2", "emb", "pool", "final")
        for term, n in sorted(self.term_counts.items(), key=lambda tn: (order + (tn[0],)).index(tn[0])):
            note = " added" if term in added_terms and self.mode == "bitfit" else ""
            lines.append(f"  {term:>8}: {n:,d} ({100.0 * n / max(self.n_total, 1):.4f}%){note}")
        if self.added and self.mode == "bitfit":
            lines.append(f"  added biases: {len(self.added)} tensors, {sum(self.added.values()):,d} values, "
                         "zero-initialised where the model had none (outputs at initialisation unchanged)")
        return "\n".join(lines)

    def _mask_on(self, name: str, device: torch.device) -> torch.Tensor:
        """The mask (and kept values) of ``name`` on ``device``: the trainer may move the model
        after prepare_model()."""
        if self.masks[name].device != device:
            self.masks[name] = self.masks[name].to(device)
            self.originals[name] = self.originals[name].to(device)
        return self.masks[name]

    def mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._mask_on(name, grad.device)

    @torch.no_grad()
    def restore_frozen_entries(self, model: nn.Module) -> None:
        """Put back every masked-out entry, so weight decay or Adam can never move it."""
        params = dict(model.named_parameters())
        for name in self.masks:
            p = params[name]
            p.copy_(torch.where(self._mask_on(name, p.device), p, self.originals[name]))


def random_masks(
    model: nn.Module, k: int, *, row_col: bool, seed: int
) -> dict[str, torch.Tensor]:
    """Draw exactly ``k`` backbone weight entries at random, without replacement.

    Candidates are the backbone's non-bias parameters (weight matrices, embeddings, LayerNorm
    gains). ``row_col`` draws whole rows or columns of the 2-D ones instead; the last line drawn
    is cut short so that the total is exactly ``k``. Same seed, same draw.
    """
    bias_ids = bias_parameter_ids(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    cands = [
        (by_id[id(p)], p)
        for _, p in backbone_of(model).named_parameters()
        if id(p) not in bias_ids and (p.dim() == 2 or not row_col)
    ]
    total = sum(p.numel() for _, p in cands)
    if k > total:
        raise ValueError(f"cannot draw {k} weights from {total} candidates.")
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for n, p in cands}
    if not row_col:
        # Unique of i.i.d. draws is a uniformly random set; a random k-subset of it is too.
        chosen = torch.empty(0, dtype=torch.long)
        while chosen.numel() < k:
            draw = torch.randint(total, (2 * (k - chosen.numel()) + 16,), generator=g)
            chosen = torch.unique(torch.cat([chosen, draw]))
        chosen = chosen[torch.randperm(chosen.numel(), generator=g)[:k]]
        offsets = torch.tensor([0] + [p.numel() for _, p in cands]).cumsum(0)
        which = torch.bucketize(chosen, offsets[1:], right=True)
        for i, (n, _) in enumerate(cands):
            local = chosen[which == i] - offsets[i]
            masks[n].view(-1)[local.to(masks[n].device)] = True
        return masks
    lines = [(n, axis) for n, p in cands for axis in (0, 1) for _ in range(p.shape[axis])]
    # Index of each line within its (param, axis) block.
    starts: dict[tuple[str, int], int] = {}
    for i, key in enumerate(lines):
        starts.setdefault(key, i)
    count = 0
    for li in torch.randperm(len(lines), generator=g).tolist():
        name, axis = lines[li]
        idx = li - starts[(name, axis)]
        line = masks[name][idx] if axis == 0 else masks[name][:, idx]
        free = (~line).nonzero().flatten()
        take = free[: k - count]
        line[take] = True  # a view: writes through to the mask
        count += take.numel()
        if count == k:
            break
    return masks


@torch.no_grad()
def add_biases(model: nn.Module, added: dict[str, int]) -> list[str]:
    """Give each named Linear/LayerNorm a zero bias of the listed length, on its weight's device and in
    its dtype; a name that is a parameter already is left alone. Returns the names created. Zero
    bias: ``F.linear``/``F.layer_norm`` add it last, so the outputs are unchanged."""
    params = dict(model.named_parameters())
    created: list[str] = []
    try:
        for name, size in added.items():
            if name in params:
                continue
            mod_name, _, attr = name.rpartition(".")
            module = model.get_submodule(mod_name)
            addable = isinstance(module, ADDABLE_BIAS_TYPES) and getattr(module, "bias", None) is None
            if attr != "bias" or not addable:
                raise ValueError(f"cannot add bias {name}: {mod_name} is a {type(module).__name__}; biases are added "
                                 "to Linear and LayerNorm modules built without one.")
            if bias_size(module) != size:
                raise ValueError(f"cannot add bias {name} of length {size}: {mod_name} takes one of "
                                 f"{bias_size(module)}.")
            ref = module.weight if getattr(module, "weight", None) is not None else next(model.parameters())
            # A quantized layer's weight is stored packed (uint8 / int8): its bias is fp32, added outside it.
            module.bias = nn.Parameter(torch.zeros(size, device=ref.device, dtype=new_bias_dtype(module)))
            created.append(name)
        float_biases_outside(model, created)
    except BaseException:
        remove_biases(model, created)  # all or nothing
        raise
    return created


@torch.no_grad()
def remove_biases(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`add_biases`: the modules go back to having no bias."""
    for name in names:
        mod_name, _, _ = name.rpartition(".")
        model.get_submodule(mod_name).bias = None


def refuse_peft_model(model: nn.Module, mode: str) -> None:
    """Bias-only modes select by the base model's own parameter names and save those tensors as a
    delta onto the plain base; a PEFT model renames them (``base_model.model.``, ``base_layer``) and
    saves adapters its own way, so the two would not combine into one loadable result."""
    if is_peft_model(model):
        raise UsageError(f"mode {mode!r} does not take a PEFT model ({type(model).__name__}): BitFit selects and saves "
                         "biases of the plain base model, and PEFT renames and saves its own. Pass the base model "
                         "unwrapped for BitFit, or train the PEFT model with mode 'full' (its adapters as PEFT set "
                         "them; LoraConfig(bias='all') adds the biases).")


def prepare_model(
    model: nn.Module,
    config: BitFitConfig | None = None,
    *,
    bias_map: BiasMap | None = None,
    seed: int = 42,
) -> BitFitState:
    """Freeze ``model`` in place for ``config.mode`` and return what is trained.

    Frozen tensors get ``requires_grad=False`` so autograd does no weight-gradient work for them.
    """
    config = config or BitFitConfig()
    if config.mode in PEFT_MODES and not is_peft_model(model):
        raise UsageError(f"mode {config.mode!r} trains a PEFT model: wrap it first (bitfit_tasks.wrap_with_peft, "
                         "which BitFitTrainer calls), or pass it to BitFitTrainer as it is.")
    if config.mode not in ("full", *PEFT_MODES):
        refuse_peft_model(model, config.mode)
        check_quantized_mode(model, config.mode, lean=config.lean, head=head_parameter_names(model))
    keep_trainable_layout(model)  # a 4-bit base on a CPU: see there
    if config.mode in PEFT_MODES:
        head_all = peft_head_names(model)
    else:
        head_all = head_parameter_names(model)
    head = head_all if config.train_head else []
    if config.train_lm_head and config.mode not in ("full", *PEFT_MODES):
        lm_head = lm_head_parameter_names(model)
        if not lm_head:
            raise UsageError(f"train_lm_head: {type(model).__name__} has no pretrained output head outside its "
                             "backbone (not a language model, or its head is tied to the input embeddings); drop "
                             "--train_lm_head.")
        head_all, head = head_all + lm_head, head + lm_head
    all_params = dict(model.named_parameters())
    n_total = sum(logical_numel(p) for p in all_params.values())
    terms: dict[str, list[str]] = {}
    masks: dict[str, torch.Tensor] = {}
    added: dict[str, int] = {}

    if config.mode in ("full", *PEFT_MODES):
        # Full fine-tuning as Trainer does it: what the model itself marks trainable (a frozen
        # embedding, a frozen encoder half, a PEFT model's adapters stay as the user set them).
        trainable = [n for n, p in all_params.items() if p.requires_grad and (config.train_head or n not in head_all)]
        head = [n for n in head if n in trainable]
    elif config.mode == "frozen":
        trainable = list(head)
    else:
        plan = plan_bias_selection(model, config.bias_terms, bias_map=bias_map, add_missing=config.add_missing_biases)
        terms = plan.terms
        if config.mode == "bitfit":
            added = plan.added
            add_biases(model, added)
            # On a quantized base: biases of bitsandbytes layers in fp32, outside bitsandbytes (see there).
            float_biases_outside(model, [n for names in terms.values() for n in names])
            all_params = dict(model.named_parameters())
            n_total = sum(logical_numel(p) for p in all_params.values())
            trainable = [n for names in terms.values() for n in names] + head
            for name, ranges in plan.slices.items():
                # q/k/v of a fused projection: the other parts of its bias keep their values.
                mask = torch.zeros(all_params[name].shape, dtype=torch.bool, device=all_params[name].device)
                for a, b in ranges:
                    mask[a:b] = True
                masks[name] = mask
        else:
            # The random baselines train as many weights as BitFit would train bias values.
            masks = random_masks(
                model,
                sum(plan.counts.values()),
                row_col=config.mode == "rand_row_col",
                seed=config.mask_seed if config.mask_seed is not None else seed,
            )
            masks = {n: m for n, m in masks.items() if bool(m.any())}
            trainable = list(masks) + head

    trainable = list(dict.fromkeys(trainable))
    if not trainable and config.mode == "full":
        raise UsageError(f"mode 'full' trains what the model marks trainable, and every parameter of "
                         f"{type(model).__name__}{' outside the head' if not config.train_head else ''} has "
                         "requires_grad=False; unfreeze what should train (p.requires_grad_(True)).")
    if not trainable:
        raise UsageError(
            f"mode {config.mode!r} with bias_terms={config.bias_terms} and "
            f"train_head={config.train_head} leaves nothing trainable in "
            f"{type(model).__name__}; enable train_head or choose bias terms the model has."
        )
    keep = set(trainable)
    for n, p in all_params.items():
        p.requires_grad_(n in keep)
    if config.mode in PEFT_MODES:
        # The model's own size, as for the other modes: not PEFT's adapters and trained copies of the head.
        n_total = sum(logical_numel(p) for n, p in all_params.items() if n not in keep and n not in head_all)

    head_n = sum(all_params[n].numel() for n in head)
    if config.mode in ("full", *PEFT_MODES):
        what = "backbone" if config.mode == "full" else f"{config.mode} adapters"
        term_counts = {what: sum(all_params[n].numel() for n in trainable if n not in head_all)}
    elif config.mode == "frozen":
        term_counts = {}
    elif config.mode != "bitfit":
        term_counts = {config.mode: sum(int(m.sum()) for m in masks.values())}
    else:
        term_counts = dict(plan.counts)
    if head:
        term_counts["head"] = head_n
    n_trainable = sum(term_counts.values())

    state = BitFitState(
        mode=config.mode,
        terms=terms,
        head=head,
        trainable=trainable,
        n_trainable=n_trainable,
        n_total=n_total,
        masks=masks,
        originals={n: all_params[n].detach().clone() for n in masks},
        term_counts=term_counts,
        head_all=head_all,
        added=added,
    )
    for name in masks:
        # Zero the gradient outside the mask, so clipping norms and Adam moments see only the
        # drawn entries; restore_frozen_entries() then undoes weight decay after each step.
        all_params[name].register_hook(functools.partial(state.mask_grad, name))
    return state


__all__ = ["BitFitState", "add_biases", "is_peft_model", "prepare_model", "random_masks", "remove_biases"]
