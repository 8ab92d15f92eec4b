"""Applying a delta onto a base model in place, and undoing it bit for bit; building the task model
of base + delta (:func:`load_task_model`)."""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from ..core.prepare import add_biases, remove_biases
from ..core.quantized import (
    bnb_config_text,
    describe_quantization,
    float_biases_outside,
    is_quantized_model,
    keep_trainable_layout,
    quantization_record,
)
from ..core.signature import base_mismatch, frozen_tensors
from ..utils.errors import UsageError, first_line
from .format import Delta

# The deltas applied to a model and not yet removed, oldest first: weak references (a handle dropped can no
# longer be removed, and its saved values are freed), kept on the model itself, not in global state.
_APPLIED = "_bitfit_applied_deltas"


class _Applied(list):
    """Handles belong to this model object: a pickled or deep-copied model carries none."""

    def __reduce__(self):
        return (_Applied, ())

    def __deepcopy__(self, memo):
        return _Applied()


def _applied(model: nn.Module) -> list[weakref.ref]:
    refs = model.__dict__.setdefault(_APPLIED, _Applied())
    refs[:] = [r for r in refs if r() is not None]
    return refs


@dataclass(eq=False)
class AppliedDelta:
    """Handle returned by :func:`apply_delta`; ``remove()`` takes this delta's values out again. Deltas applied
    on top of each other come off in any order: once all are removed the base is back bit for bit."""

    model: nn.Module
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Biases the delta added to a base built without them: removed again, not zeroed.
    created: list[str] = field(default_factory=list)

    @torch.no_grad()
    def remove(self) -> None:
        stack = _applied(self.model)
        mine = next((i for i, r in enumerate(stack) if r() is self), None)
        later = [r() for r in stack[mine + 1:]] if mine is not None else []
        params = dict(self.model.named_parameters())
        gone = []
        for name, value in self.originals.items():
            # A delta applied after this one over the same tensor holds this one's value as its original: it
            # inherits what was there before this delta (and the bias to take away, if this delta created it).
            heir = next((h for h in later if name in h.originals), None)
            if heir is not None:
                heir.originals[name] = value
                if name in self.created and name not in heir.created:
                    heir.created.append(name)
            elif name in self.created:
                gone.append(name)
            elif name in params:
                params[name].copy_(value)
        remove_biases(self.model, [n for n in gone if n in params])
        if mine is not None:
            del stack[mine]
        self.originals, self.created = {}, []


def check_compatible(model: nn.Module, delta: Delta, *, verify_fingerprint: bool = True,
                     signature: dict[str, dict] | None = None) -> None:
    """Raise ``ValueError`` naming the problem if ``delta`` does not belong on ``model``.
    ``signature``: the model's own base signature, taken earlier over the same tensors (BitFitTrainer
    takes it once, before lean mode rounds the frozen weights); otherwise it is computed now."""
    params = dict(model.named_parameters())
    missing = [n for n in delta.tensors if n not in params]
    if missing:
        raise UsageError(
            f"delta {delta.path} has tensors the model lacks, e.g. {missing[:3]} (model "
            f"{type(model).__name__}, delta trained on {delta.meta.get('task_class')}); load the base "
            f"with the delta's task class."
        )
    bad = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in delta.tensors.items()
           if tuple(t.shape) != tuple(params[n].shape)]
    if bad:
        n, want, have = bad[0]
        raise UsageError(
            f"delta {delta.path}: shape of {n} is {want} but the model's is {have}"
            + (" (load the base with the delta's num_labels)" if n in delta.meta.get("head", []) else "")
            + "."
        )
    if not verify_fingerprint:
        return
    why = base_mismatch(delta.meta, frozen_tensors(model, delta.tensors), signature)
    if why is not None:
        trained, here = delta.meta.get("quantization"), quantization_record(model)
        if trained and here and trained != here and ("stored bnb-" in why or " differ (hash" in why
                                                     and "bnb-" in why):
            # Same checkpoint, other quantization settings: say how to load it as the delta was trained.
            raise UsageError(
                f"delta {delta.path} was trained on another quantized load of its base ({why}): it was trained on a "
                f"{describe_quantization(trained)} load, this one is {describe_quantization(here)}. Load the base "
                f"with quantization_config={bnb_config_text(trained)}, or in full precision.")
        how = "" if not (trained or here) else (
            f" It was trained on a {describe_quantization(trained)} load, this one is {describe_quantization(here)}.")
        raise UsageError(
            f"delta {delta.path} was trained on a different base model ({why}; delta base: "
            f"{delta.meta.get('base_model')!r}).{how} Load that base, or pass verify_fingerprint=False if you know "
            "better.")


def create_added_biases(model: nn.Module, delta: Delta) -> list[str]:
    """The zero biases a delta trained where its base had none, created on ``model`` if it lacks them
    (a base loaded fresh); returns the names created. A module that cannot take one is one line."""
    added = delta.meta.get("added_biases") or {}
    try:
        return add_biases(model, added)
    except (AttributeError, ValueError) as err:  # get_submodule: no such module
        raise UsageError(f"delta {delta.path} adds biases this model cannot hold ({first_line(err)}); load the base "
                         f"the delta was trained on ({delta.meta.get('base_model')!r}, "
                         f"{delta.meta.get('task_class')}).") from None


@torch.no_grad()
def apply_delta(
    model: nn.Module, delta: Delta | str | os.PathLike, *, verify_fingerprint: bool = True,
    signature: dict[str, dict] | None = None, **hub_kwargs
) -> AppliedDelta:
    """Copy a delta's tensors (a :class:`Delta`, a local folder or a Hub id) into ``model`` in place
    (cast to each parameter's dtype and device); keep the replaced values for ``remove()``.
    ``signature``: see :func:`check_compatible`."""
    delta = delta if isinstance(delta, Delta) else Delta.from_pretrained(delta, **hub_kwargs)
    created: list[str] = []
    try:
        created = create_added_biases(model, delta)
        check_compatible(model, delta, verify_fingerprint=verify_fingerprint, signature=signature)
    except BaseException:
        remove_biases(model, created)  # a refused delta leaves the model as it was
        raise
    if is_quantized_model(model):
        # As the trained model computed: biases in fp32 outside bitsandbytes, the load's weight layout.
        float_biases_outside(model, list(delta.tensors))
        keep_trainable_layout(model)
    params = dict(model.named_parameters())
    handle = AppliedDelta(model, created=created)
    _applied(model).append(weakref.ref(handle))
    for name, value in delta.tensors.items():
        p = params[name]
        handle.originals[name] = p.detach().clone()
        p.copy_(value.to(device=p.device, dtype=p.dtype))  # a lean (bf16) model takes it rounded
    return handle


def task_model_class(name: str, source: str = "the delta") -> type:
    """The transformers model class a delta's ``task_class`` names (e.g. BertForSequenceClassification).
    Anything else is one line: a delta saved from the user's own ``nn.Module`` applies onto that
    module (built by the user), which :func:`load_task_model` cannot build."""
    cls = None
    if name.isidentifier():
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazy attribute whose import fails (a missing optional backend)
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UsageError(f"{source}: task_class {name[:60]!r} is not a transformers model class (e.g. "
                         "BertForSequenceClassification), the kind of class built from a base model's name. A delta "
                         f"of your own module applies onto that module: build it, then apply_delta(model, {source!r}).")
    return cls


def task_config_for(config, delta: Delta):
    """The base's config with the delta's task settings (labels, problem type, padding token)."""
    task_cfg = delta.meta.get("task_config") or {}
    # pad_token_id: a decoder trained with the eos token as padding finds each row's last token by it.
    for key in ("num_labels", "id2label", "label2id", "problem_type", "pad_token_id"):
        if key in task_cfg:
            setattr(config, key, task_cfg[key])
    if "id2label" in task_cfg:
        config.id2label = {int(k): v for k, v in task_cfg["id2label"].items()}
    return config


def base_task_model(base_model: str, delta: Delta, *, dtype: torch.dtype | str | None = None,
                    **from_pretrained_kwargs) -> nn.Module:
    """The base loaded with the delta's task class and task config, before the delta is applied."""
    cls = task_model_class(delta.meta["task_class"], source=delta.path or "the delta")
    config = task_config_for(transformers.AutoConfig.from_pretrained(base_model), delta)
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    return quietly_from_pretrained(cls, base_model, config=config, **from_pretrained_kwargs)


def quietly_from_pretrained(cls: type, base_model: str, **kwargs) -> nn.Module:
    """``cls.from_pretrained`` of a base whose head (and added biases) a delta or adapter supplies:
    transformers' report of them as "newly initialised" would only mislead."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return cls.from_pretrained(base_model, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_task_model(base_model: str, delta: str | os.PathLike | Delta, *, revision: str | None = None,
                    dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                    verify_fingerprint: bool = True, **from_pretrained_kwargs):
    """Base model + delta (a local folder or a Hub id; ``revision`` picks the delta's) -> the
    fine-tuned task model: the task class and config come from the delta. ``dtype`` (e.g.
    ``torch.bfloat16``) and ``device`` (e.g. ``"cuda"``) load the base that way; the delta's tensors
    are cast to match, and a delta trained on the fp32 base is accepted on it (see the signature
    comment above). ``from_pretrained_kwargs`` go to the base model's ``from_pretrained``."""
    if not isinstance(delta, Delta):
        delta = Delta.from_pretrained(delta, revision=revision, cache_dir=from_pretrained_kwargs.get("cache_dir"),
                                      token=from_pretrained_kwargs.get("token"))
    model = base_task_model(base_model, delta, dtype=dtype, **from_pretrained_kwargs)
    if device is not None:
        model.to(device)
    apply_delta(model, delta, verify_fingerprint=verify_fingerprint)
    return model
