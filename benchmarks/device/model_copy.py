"""Pack the offline pretrained model into the device kit as an fp16 copy, or restore it to fp32.

    python benchmarks/device/model_copy.py pack MODEL_DIR KIT/model       # here: fp16 tensors, xz-compressed
    python benchmarks/device/model_copy.py restore KIT/model WORK/model   # there: an fp32 from_pretrained folder

The fp32 model (91 MB) does not fit what travels to the GPU machine; its fp16 copy does. Restored
weights are the fp16 values widened to fp32 (each within 2^-11 relative of the original), so scores
on the GPU come from that rounded copy of the model, not bit for bit from the original.
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
PACKED = "model.fp16.safetensors.xz"
# Everything from_pretrained and the tokenizer read; the sentence-transformers extras stay behind.
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def pack(model_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in load_file(str(model_dir / WEIGHTS)).items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/{WEIGHTS}", metadata={"format": "pt"})
        with open(f"{tmp}/{WEIGHTS}", "rb") as src, lzma.open(out / f".{PACKED}.tmp", "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    (out / f".{PACKED}.tmp").replace(out / PACKED)
    for name in FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out / name)


def restore(packed: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with lzma.open(packed / PACKED, "rb") as src, open(f"{tmp}/{WEIGHTS}", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tensors = {k: (v.float() if v.is_floating_point() else v).contiguous()
                   for k, v in load_file(f"{tmp}/{WEIGHTS}").items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    for name in FILES:
        if (packed / name).exists():
            shutil.copy2(packed / name, out / name)
    assert all(t.dtype != torch.float16 for t in tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["pack", "restore"])
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    a = ap.parse_args()
    (pack if a.action == "pack" else restore)(a.source, a.dest)


if __name__ == "__main__":
    main()
