"""Content-keyed Arrow caches for preprocessed features: ``datasets.map(..., cache_file_name=...)``
into a file named by a hash of everything the features depend on (the examples' content, the
tokenizer, the settings), so other processes and later runs with the same inputs load it, and any
change gives a new file, never a stale one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def tokenizer_digest(tokenizer) -> str:
    """What the tokenizer produces: its vocabulary, normaliser, pre-tokeniser, model, post-processor.
    The truncation/padding state is left out: a call with ``truncation=True`` changes it in place."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec_dict = json.loads(backend.to_str())
        spec_dict.pop("truncation", None)
        spec_dict.pop("padding", None)
        spec = json.dumps(spec_dict, sort_keys=True)
    else:
        spec = repr(tokenizer)
    extra = getattr(tokenizer, "add_prefix_space", None)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.padding_side}|{extra}|{spec}".encode()).hexdigest()


def content_digest(items, fields: tuple[str, ...]) -> str:
    """sha256 over the given fields of every example, in order."""
    h = hashlib.sha256()
    for item in items:
        for f in fields:
            v = item[f]
            h.update(v.encode() if isinstance(v, str) else json.dumps(v, ensure_ascii=False).encode())
            h.update(b"\0")
    return h.hexdigest()


def cache_file(task: str, kind: str, key: list[Any], cache_dir: str | None = None) -> str:
    import datasets.config

    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "bitfit_tasks" / task
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:24]
    return str(folder / f"{kind}-{digest}.arrow")
