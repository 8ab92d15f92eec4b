"""``bitfit-delta``: inspect a bias-only checkpoint, or merge it into a full model.

    bitfit-delta info runs/rte
    bitfit-delta export runs/rte --output merged-rte
    bitfit-delta info user/minilm-rte-bitfit --revision main      (a delta on the Hugging Face Hub)
    bitfit-delta export-peft runs/rte peft-rte                 (a PEFT BEFT adapter: PeftModel.from_pretrained)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..delta.format import Delta
from ..delta.merge import export_merged


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitfit-delta", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="list a delta's tensors, terms, sizes and base model")
    info.add_argument("delta_dir", help="delta folder or Hub repository id")
    info.add_argument("--revision", help="Hub revision (branch, tag or commit) of a Hub delta")
    info.add_argument("--tensors", action="store_true", help="also list every tensor with its shape")
    exp = sub.add_parser("export", help="apply the delta to its base and save a full (merged) model")
    exp.add_argument("delta_dir", help="delta folder or Hub repository id")
    exp.add_argument("--revision", help="Hub revision (branch, tag or commit) of a Hub delta")
    exp.add_argument("--base", help="base model id/folder (default: the one recorded in the delta)")
    exp.add_argument("--output", required=True, help="folder for the merged from_pretrained model")
    pe = sub.add_parser("export-peft", help="write the delta as a PEFT BEFT adapter folder (needs peft)")
    pe.add_argument("delta_dir", help="delta folder or Hub repository id")
    pe.add_argument("output", help="new or empty folder for the adapter")
    pe.add_argument("--revision", help="Hub revision (branch, tag or commit) of a Hub delta")
    pe.add_argument("--base", help="base model id/folder (default: the one recorded in the delta)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    delta = Delta.from_pretrained(a.delta_dir, revision=a.revision)
    if a.cmd == "info":
        print(delta.describe())
        if a.tensors:
            for name, t in delta.tensors.items():
                print(f"    {name}  {tuple(t.shape)}  {t.dtype}")
        return 0
    base = a.base or delta.meta.get("base_model")
    if not base:
        p.error("the delta records no base model; pass --base")
    if a.cmd == "export-peft":
        from ..peft_interop.convert import export_peft

        out = export_peft(base, delta, a.output)
        print(f"PEFT BEFT adapter written to {out}; load it with PeftModel.from_pretrained(base_model, {str(out)!r})")
        return 0
    out = export_merged(base, delta.path, a.output)
    print(f"merged model written to {out}")
    return 0


def entry() -> None:
    """The ``bitfit-delta`` console script: a bad path or delta ends in one line, exit code 1."""
    from ..utils.launch import run_cli

    run_cli(main)


if __name__ == "__main__":
    entry()
