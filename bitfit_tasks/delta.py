"""Bias-only checkpoints ("deltas"): save the trained tensors only, apply them onto a base, undo them.

Deltas load from a local folder or a Hugging Face Hub id, as PEFT adapters do::

    model = load_task_model("sentence-transformers/all-MiniLM-L6-v2", "user/minilm-rte-bitfit")
    delta = Delta.from_pretrained("user/minilm-rte-bitfit", revision="main")
    delta.save_pretrained("deltas/rte")

A delta folder holds

* ``bitfit_delta.safetensors``: the trained tensors (selected biases + head; for the random
  baselines the touched weight tensors), by their names in the task model;
* ``bitfit_delta.json``: the base model, task class, task config, mode and terms, tensor shapes,
  and a fingerprint of the frozen base weights, so a delta is never applied to the wrong backbone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from .core import add_biases, remove_biases
from .errors import MissingFileError, UsageError, first_line, read_utf8
from .fileio import atomic_write_text, check_new_folder, publish_folder
from .model_card import model_card
from .selection import added_bias_sizes, bias_map_for, head_parameter_names
from .signature import base_mismatch, base_signature, check_signature_field, frozen_tensors, signature_id

DELTA_WEIGHTS = "bitfit_delta.safetensors"
DELTA_CONFIG = "bitfit_delta.json"
FORMAT_VERSION = 1


def is_delta_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / DELTA_WEIGHTS).is_file() and (Path(path) / DELTA_CONFIG).is_file()


def delta_tensor_names(model: nn.Module) -> list[str]:
    """What a delta stores: every trainable tensor (the selected biases, head, random-mode weights)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_delta(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    names: list[str] | None = None,
    mode: str = "bitfit",
    terms: dict[str, list[str]] | None = None,
    base_model: str | None = None,
    signature: dict[str, dict] | None = None,
    added: dict[str, int] | None = None,
) -> Path:
    """Write the trained tensors of ``model`` (``names``, default: those with requires_grad).
    ``signature``: the base's signature taken earlier (before lean mode rounded it), else computed
    now. ``added``: the biases BitFit added to a base built without them (name -> length); applying
    the delta re-creates them."""
    names = names if names is not None else delta_tensor_names(model)
    delta = delta_of(model, names, mode=mode, terms=terms, base_model=base_model, signature=signature, added=added)
    return write_delta_files(Path(output_dir), delta.tensors, delta.meta)


def delta_of(model: nn.Module, names: list[str], *, mode: str = "bitfit", terms: dict[str, list[str]] | None = None,
             base_model: str | None = None, signature: dict[str, dict] | None = None,
             added: dict[str, int] | None = None) -> Delta:
    """The :class:`Delta` of ``model``'s tensors ``names`` (in memory; :func:`save_delta` writes it)."""
    if not names:
        raise ValueError("nothing to save: the model has no trainable tensors; pass names= explicitly.")
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in names}
    config = getattr(model, "config", None)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model or getattr(config, "_name_or_path", None),
        "task_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "task_config": config.to_dict() if config is not None else None,
        "mode": mode,
        "terms": terms or {},
        "head": [n for n in head_parameter_names(model) if n in tensors],
        "shapes": {n: list(t.shape) for n, t in tensors.items()},
        "n_params": sum(p.numel() for p in model.parameters()),
        # Given by the trainer; otherwise read off the model: biases its own class does not build.
        "added_biases": {n: int(v) for n, v in
                         (added if added is not None else added_bias_sizes(model, names)).items()},
    }
    signature = signature if signature is not None else base_signature(model, exclude=set(names))
    meta["base_fingerprint"] = signature_id(signature)
    meta["base_signature"] = signature
    return Delta(tensors=tensors, meta=meta)


def write_delta_files(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Tensors first, the JSON last, each under a temporary name renamed into place: a save killed
    at any point leaves the previous delta or no delta (is_delta_dir needs both), never half a file."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{DELTA_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "bitfit_mode": str(meta.get("mode"))})
    meta = {**meta, "weights_sha256": _sha256(tmp)}  # verified on load: a flipped byte is refused
    os.replace(tmp, out / DELTA_WEIGHTS)
    atomic_write_text(out / DELTA_CONFIG, json.dumps(meta, indent=2, default=str))
    return out


# What a delta repository on the Hub holds besides the two delta files: its card and tokenizer.
HUB_PATTERNS = [DELTA_WEIGHTS, DELTA_CONFIG, "README.md", "tokenizer*", "vocab*", "merges.txt",
                "special_tokens_map.json", "*.model"]


def resolve_delta_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                      cache_dir: str | None = None, token: str | bool | None = None,
                      local_files_only: bool = False) -> Path:
    """A local delta folder as is, otherwise a Hub repository id fetched with
    ``huggingface_hub.snapshot_download`` (the delta files, card and tokenizer only), which honours
    ``HF_HUB_OFFLINE``, the Hub cache and ``HF_TOKEN`` like every ``from_pretrained``."""
    p = Path(name_or_path)
    if p.exists():
        return p
    text = str(name_or_path)
    if p.is_absolute() or text.startswith(".") or text.count("/") > 1 or text.endswith("/"):
        raise MissingFileError(f"delta folder {text!r} does not exist (and it is not a Hub id, which looks like "
                                "user/name); check the path.")
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=str(name_or_path), revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, allow_patterns=HUB_PATTERNS)
    except HFValidationError:
        raise UsageError(f"delta {str(name_or_path)!r} is neither a local folder nor a Hub repository id "
                         "(user/name); check the path.") from None
    except (OSError, huggingface_hub.errors.HfHubHTTPError) as err:  # offline, unknown repo, no access
        first = first_line(err)
        raise UsageError(f"delta {str(name_or_path)!r}: not a local folder, and the Hub download failed "
                         f"({first[:160]}); pass a local delta folder, or check the id, --revision, HF_TOKEN "
                         "and the connection.") from None
    return Path(folder)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


REQUIRED_META = {"format_version": int, "task_class": str, "mode": str, "shapes": dict, "head": list,
                 "terms": dict, "base_fingerprint": str, "weights_sha256": str}


@dataclass
class Delta:
    """A loaded delta: tensors plus metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: str = ""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs) -> Delta:
        """Load (and check) a delta from a local folder or a Hub id; ``hub_kwargs``: ``revision``,
        ``cache_dir``, ``token``, ``local_files_only`` (see :func:`resolve_delta_dir`)."""
        return cls.load(resolve_delta_dir(name_or_path, **hub_kwargs))

    def save_pretrained(self, output_dir: str | os.PathLike) -> Path:
        """Write this delta (tensors, checked JSON, model card) into ``output_dir``, e.g. to upload it
        with ``huggingface_hub.upload_folder``; it loads back with :meth:`from_pretrained`."""
        out = write_delta_files(Path(output_dir), self.tensors, self.meta)
        n = sum(t.numel() for t in self.tensors.values())
        atomic_write_text(out / "README.md", str(model_card(out, self.meta, weights_file=DELTA_WEIGHTS, n_trainable=n,
                                                            n_total=self.meta.get("n_params") or n)))
        return out

    def push_to_hub(self, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                    revision: str | None = None, commit_message: str = "Upload BitFit delta"):
        """Upload this delta (tensors, checked JSON, model card) to a Hub model repository, created if
        missing; it loads back with ``Delta.from_pretrained(repo_id)`` / ``load_task_model(base, repo_id)``.
        Returns huggingface_hub's ``CommitInfo``."""
        return upload_delta_folder(self.save_pretrained, repo_id, token=token, private=private, revision=revision,
                                   commit_message=commit_message)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Delta:
        """Read and check a delta folder: its JSON (fields and types), the checksum of its tensor
        file, and that the tensors are the ones the JSON lists (names, shapes, float dtypes)."""
        from safetensors import SafetensorError

        p = Path(path)
        if not is_delta_dir(p):
            raise MissingFileError(
                f"{p} is not a BitFit delta: expected {DELTA_WEIGHTS} and {DELTA_CONFIG} in it "
                "(written by BitFitTrainer.save_model or bitfit_tasks.save_delta)."
            )
        try:
            meta = json.loads(read_utf8(p / DELTA_CONFIG))
        except json.JSONDecodeError as err:
            raise UsageError(f"{p / DELTA_CONFIG} is not valid JSON ({err.msg} at line {err.lineno}); the delta "
                             "is damaged: save it again.") from None
        if not isinstance(meta, dict):
            raise UsageError(f"{p / DELTA_CONFIG} must hold a JSON object; the delta is damaged: save it again.")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"{p}: delta format_version {meta.get('format_version')!r} is not supported "
                             f"(this library reads {FORMAT_VERSION}); upgrade bitfit-tasks.")
        for key, typ in REQUIRED_META.items():
            if key not in meta:
                raise UsageError(f"{p / DELTA_CONFIG} lacks the field {key!r} (written by an older or another "
                                 "tool, or edited); save the delta again with bitfit-tasks.")
            if not isinstance(meta[key], typ):
                raise UsageError(f"{p / DELTA_CONFIG}: field {key!r} must be a {typ.__name__}, got "
                                 f"{type(meta[key]).__name__}.")
        got = _sha256(p / DELTA_WEIGHTS)
        if got != meta["weights_sha256"]:
            raise UsageError(f"{p / DELTA_WEIGHTS} does not match its checksum in {DELTA_CONFIG} (sha256 {got[:12]}… "
                             f"vs {meta['weights_sha256'][:12]}…): the file was changed or damaged; save the delta "
                             "again.")
        try:
            tensors = load_file(str(p / DELTA_WEIGHTS))
        except SafetensorError as err:
            raise UsageError(f"{p / DELTA_WEIGHTS} is not a readable safetensors file ({err}).") from None
        shapes = {n: list(t.shape) for n, t in tensors.items()}
        if set(shapes) != set(meta["shapes"]):
            extra, missing = sorted(set(shapes) - set(meta["shapes"])), sorted(set(meta["shapes"]) - set(shapes))
            raise UsageError(f"{p}: the tensors and the JSON field 'shapes' disagree (only in the tensors: "
                             f"{extra[:3]}, only in the JSON: {missing[:3]}); save the delta again.")
        for name, shape in shapes.items():
            if meta["shapes"][name] != shape:
                raise UsageError(f"{p}: JSON field 'shapes' gives {name} as {meta['shapes'][name]} but the tensor is "
                                 f"{shape}; save the delta again.")
            if not tensors[name].is_floating_point():
                raise UsageError(f"{p}: tensor {name} has dtype {tensors[name].dtype}; a delta holds float tensors.")
        listed = {"head": meta["head"], **{f"terms.{t}": v for t, v in meta["terms"].items()}}
        for field_name, names in listed.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UsageError(f"{p / DELTA_CONFIG}: field {field_name!r} must be a list of tensor names, got "
                                 f"{str(names)[:60]}; save the delta again.")
            # A random-baseline delta's terms name the biases that set its budget, not saved tensors.
            absent = [n for n in names if n not in tensors] if field_name == "head" else []
            if absent:
                raise UsageError(f"{p / DELTA_CONFIG}: field {field_name!r} names tensor(s) {absent[:3]} that "
                                 f"{DELTA_WEIGHTS} lacks; the JSON was edited or damaged: save the delta again.")
        added = meta.setdefault("added_biases", {})
        if not isinstance(added, dict):
            raise UsageError(f"{p / DELTA_CONFIG}: field 'added_biases' must map bias tensors of the delta to their "
                             f"lengths, got {type(added).__name__}; the JSON was edited or damaged: save the delta "
                             "again.")
        for n, v in added.items():
            if not (n in tensors and isinstance(v, int) and not isinstance(v, bool) and shapes[n] == [v]):
                have = f"a tensor of shape {shapes[n]}" if n in tensors else "no such tensor"
                raise UsageError(f"{p / DELTA_CONFIG}: field 'added_biases' gives {n[:80]} length {v!r}, but the delta "
                                 f"holds {have}; the JSON was edited or damaged: save the delta again.")
        if not meta["task_class"].isidentifier():
            # Any class name is fine here (resume and apply_delta take the user's model); which class
            # load_task_model can build is its own check.
            raise UsageError(f"{p / DELTA_CONFIG}: task_class {meta['task_class'][:60]!r} is not a class name; the "
                             "JSON was edited or damaged: save the delta again.")
        if "base_signature" in meta:
            check_signature_field(meta["base_signature"], str(p / DELTA_CONFIG))
        return cls(tensors=tensors, meta=meta, path=str(p))

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def describe(self) -> str:
        m = self.meta
        n = sum(t.numel() for t in self.tensors.values())
        lines = [
            f"BitFit delta {self.path}",
            f"  base model : {m.get('base_model')}",
            f"  task class : {m.get('task_class')} (model_type {m.get('model_type')})",
            f"  mode       : {m.get('mode')}  terms: {', '.join(m.get('terms', {})) or '-'}",
            f"  tensors    : {len(self.tensors)} ({n:,d} values, {self.num_bytes():,d} bytes)",
            f"  fingerprint: {m.get('base_fingerprint', '')[:16]}…",
        ]
        if m.get("added_biases"):
            lines.insert(-1, f"  added      : {len(m['added_biases'])} biases, {sum(m['added_biases'].values()):,d} "
                             "values the base is built without (created again when the delta is applied)")
        for term, names in m.get("terms", {}).items():
            lines.append(f"    {term:>5}: {sum(self.tensors[x].numel() for x in names if x in self.tensors):,d}")
        lines.append(f"    {'head':>5}: {sum(self.tensors[x].numel() for x in m.get('head', [])):,d}")
        return "\n".join(lines)


def upload_delta_folder(write: Any, repo_id: str, *, token: str | bool | None, private: bool | None,
                        revision: str | None, commit_message: str):
    """``write(folder)`` a delta into a temporary folder, then create the repository (if missing) and
    upload the folder in one commit: only the delta's own files, never a run's other outputs."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, token=token, revision=revision,
                                 repo_type="model", commit_message=commit_message)


@dataclass
class AppliedDelta:
    """Handle returned by :func:`apply_delta`; ``remove()`` restores the base bit-exactly."""

    model: nn.Module
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Biases the delta added to a base built without them: removed again, not zeroed.
    created: list[str] = field(default_factory=list)

    @torch.no_grad()
    def remove(self) -> None:
        params = dict(self.model.named_parameters())
        for name, value in self.originals.items():
            # A bias another (earlier) delta created and already took away again is gone: skip it.
            if name not in self.created and name in params:
                params[name].copy_(value)
        remove_biases(self.model, self.created)
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
        raise UsageError(
            f"delta {delta.path} was trained on a different base model ({why}; delta base: "
            f"{delta.meta.get('base_model')!r}). Load that base, or pass verify_fingerprint=False if you know better.")


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
    params = dict(model.named_parameters())
    handle = AppliedDelta(model, created=created)
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
    # The delta supplies the head (and any added bias): transformers' report of them as "newly
    # initialised" would only mislead.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return cls.from_pretrained(base_model, config=config, **from_pretrained_kwargs)
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


def _skeleton(cls: type, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def flags_for_added_biases(config, delta: Delta) -> dict[str, bool]:
    """The config flags (``attention_bias``, ``mlp_bias``, ``norm_bias``, from the family's bias map) that
    make a standard model of ``config``'s class hold every bias the delta added; refused in one line
    when the config cannot express some (Mistral has no such flag, Qwen3 none for its MLP)."""
    added = set(delta.meta.get("added_biases") or {})
    cls = task_model_class(delta.meta["task_class"])
    task_cfg = delta.meta.get("task_config") or {}
    bmap = bias_map_for(config.model_type)
    base_names = {n for n, _ in _skeleton(cls, type(config).from_dict({**config.to_dict(), **task_cfg}))
                  .named_parameters()}
    flags: dict[str, bool] = {}
    covered: set[str] = set()
    for flag in (bmap.config_flags if bmap is not None else ()):
        if getattr(config, flag, None) is not False:
            continue
        on = type(config).from_dict({**config.to_dict(), **task_cfg, flag: True})
        new = {n for n, _ in _skeleton(cls, on).named_parameters()} - base_names
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
    merged = _skeleton(type(model), config)
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
