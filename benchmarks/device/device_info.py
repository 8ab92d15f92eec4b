"""What the machine the kit runs on holds: accelerator, library versions, and the pretrained weights
already in its Hugging Face caches (a larger encoder there would let GLUE run on a paper-size model).

    python benchmarks/device/device_info.py OUT.json
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from pathlib import Path


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "datasets", "pyarrow", "fsspec", "huggingface_hub", "peft",
                 "seqeval", "sklearn", "filelock", "safetensors", "tokenizers"):
        try:
            mod = importlib.import_module(name)
            out[name] = f"{getattr(mod, '__version__', '?')} ({Path(mod.__file__).parent})"
        except Exception as err:  # a missing or broken package is what this records
            out[name] = f"not importable: {type(err).__name__}: {str(err)[:120]}"
    return out


def cached_models() -> list[str]:
    """``models--org--name`` folders in the usual cache places, and sentence-transformers' own cache."""
    roots = {Path.home() / ".cache" / "huggingface" / "hub", Path("/root/.cache/huggingface/hub"),
             Path.home() / ".cache" / "torch" / "sentence_transformers"}
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "SENTENCE_TRANSFORMERS_HOME"):
        if os.environ.get(var):
            roots |= {Path(os.environ[var]), Path(os.environ[var]) / "hub"}
    found = set()
    for root in roots:
        if root.is_dir():
            found |= {f"{p} ({sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) // 2**20} MiB)"
                      for p in root.iterdir() if p.is_dir()}
    return sorted(found)


def main() -> None:
    import torch

    info = {"argv": sys.argv, "platform": platform.platform(), "cpu_count": os.cpu_count(), "versions": versions(),
            "cuda": torch.cuda.is_available(), "hf_cache_models": cached_models(),
            "hf_env": {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS", "SENTENCE"))}}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
    Path(sys.argv[1]).write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("cuda", "hf_cache_models") if k in info}))


if __name__ == "__main__":
    main()
