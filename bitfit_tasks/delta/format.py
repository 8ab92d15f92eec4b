"""The delta format and its checked I/O: a :class:`Delta` of the trained tensors only, written and read back.

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

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.quantized import quantization_record
from ..core.selection import added_bias_sizes, head_parameter_names, lm_head_parameter_names
from ..core.signature import base_signature, check_signature_field, signature_id
from ..utils.errors import MissingFileError, UsageError, read_utf8
from ..utils.fileio import as_created, atomic_write_text
from .card import model_card
from .files import DELTA_CONFIG, DELTA_WEIGHTS, is_delta_dir, resolve_delta_dir, upload_delta_folder

FORMAT_VERSION = 1


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
             added: dict[str, int] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Delta:
    """The :class:`Delta` of ``model``'s tensors ``names`` (in memory; :func:`save_delta` writes it).
    ``tensors``: the values to store instead of the model's own; ``model`` (a meta-device skeleton will do)
    then gives the task class, config, head and size, and ``signature`` and ``added`` must be given."""
    if not names:
        raise ValueError("nothing to save: the model has no trainable tensors; pass names= explicitly.")
    source = tensors if tensors is not None else dict(model.named_parameters())
    tensors = {n: source[n].detach().to("cpu").contiguous() for n in names}
    params = dict(model.named_parameters())
    config = getattr(model, "config", None)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model or getattr(config, "_name_or_path", None),
        "task_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "task_config": config.to_dict() if config is not None else None,
        "mode": mode,
        "terms": terms or {},
        # The task head, and a language model's own head where it was trained (train_lm_head).
        "head": [n for n in [*head_parameter_names(model), *lm_head_parameter_names(model)] if n in tensors],
        "shapes": {n: list(t.shape) for n, t in tensors.items()},
        # Biases the delta adds that the model does not hold yet (a skeleton of the base) count too.
        "n_params": sum(p.numel() for p in params.values()) + sum(tensors[n].numel() for n in names if n not in params),
        # Given by the trainer; otherwise read off the model: biases its own class does not build.
        "added_biases": {n: int(v) for n, v in
                         (added if added is not None else added_bias_sizes(model, names)).items()},
    }
    # The base's quantization (bitsandbytes 4-/8-bit), None in full precision: the same quantized load
    # re-applies it exactly, and its model card says how it was trained.
    meta["quantization"] = quantization_record(model)
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
    as_created(tmp)  # safetensors makes its files 0600
    os.replace(tmp, out / DELTA_WEIGHTS)
    atomic_write_text(out / DELTA_CONFIG, json.dumps(meta, indent=2, default=str))
    return out


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
        if not isinstance(meta.setdefault("quantization", None), dict | None):
            raise UsageError(f"{p / DELTA_CONFIG}: field 'quantization' must be an object or null, got "
                             f"{type(meta['quantization']).__name__}; the JSON was edited or damaged: save the delta "
                             "again.")
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
        if m.get("quantization"):
            q = m["quantization"]
            lines.insert(-1, f"  quantized  : trained on a {q.get('method')} {q.get('bits')}-bit base"
                             + (f" ({q.get('quant_type')})" if q.get("quant_type") else ""))
        if m.get("added_biases"):
            lines.insert(-1, f"  added      : {len(m['added_biases'])} biases, {sum(m['added_biases'].values()):,d} "
                             "values the base is built without (created again when the delta is applied)")
        for term, names in m.get("terms", {}).items():
            lines.append(f"    {term:>5}: {sum(self.tensors[x].numel() for x in names if x in self.tensors):,d}")
        lines.append(f"    {'head':>5}: {sum(self.tensors[x].numel() for x in m.get('head', [])):,d}")
        return "\n".join(lines)
