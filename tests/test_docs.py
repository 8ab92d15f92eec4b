"""The docs stay honest: every command line in README.md and docs/*.md that runs an entry point of this
project parses with that entry point's own parser (nothing is run), and every ``--flag`` the docs name
exists somewhere a reader could pass it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bitfit_tasks.experiments import analysis, sweep
from bitfit_tasks.serving import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Made by tests/test_bad_input.py: the inputs that must fail and their messages, not commands to run.
NOT_COMMANDS = {ROOT / "docs" / "bad-input.md"}
RUNNER_SCRIPTS = {f"run_{r}.py": r for r in sweep.RUNNERS}
# Flags of the launchers and tools the docs show around our entry points (not ours to check).
FOREIGN_FLAGS = {"--multi_gpu", "--num_processes", "--nproc_per_node", "--num_machines", "--machine_rank",
                 "--main_process_ip", "--main_process_port", "--no-deps", "--upgrade"}


def strict(parser):
    """The parser with abbreviations off: a doc must spell a flag in full (a renamed flag that happens
    to be a prefix of another would parse otherwise)."""
    parser.allow_abbrev = False
    for sub in getattr(parser, "_subparsers", None) and parser._subparsers._group_actions[0].choices.values() or ():
        sub.allow_abbrev = False
    return parser


def runner_parser(runner: str):
    return strict(sweep.runner_parser(runner))


def tokens_of(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return line.split()


# One TrainingArguments option under its two names (transformers 5.24 renamed it; the docs give both).
RENAMED = [{"--gradient_checkpointing", "--activation_checkpointing"}]


def known_flags() -> set[str]:
    flags = set(FOREIGN_FLAGS)
    parsers = [runner_parser(r) for r in sweep.RUNNERS] + [sweep.build_parser(), analysis.build_parser()]
    cli_parser = cli.build_parser()
    parsers += list(cli_parser._subparsers._group_actions[0].choices.values())
    for p in parsers:
        flags |= {o for o in p._option_string_actions if o.startswith("--")}
    for script in (ROOT / "benchmarks" / "device").glob("*.sh"):  # the kit's options: its `case` patterns
        flags |= set(re.findall(r"^\s+(--[\w-]+)\)", script.read_text(), re.M))
    for names in RENAMED:
        if names & flags:
            flags |= names
    return flags


def code_lines(text: str) -> list[str]:
    """Lines of code blocks (fenced, except Python, or indented by 4) with backslash continuations
    joined, plus inline code spans that are whole commands."""
    out, fence, buf = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:] or "text")
            continue
        in_block = (fence is not None and fence != "python") or (fence is None and line.startswith("    "))
        if not in_block:
            buf = ""
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"(python |accelerate launch |torchrun |bitfit-delta )", span):
                    out.append(span)
            continue
        buf += stripped.removesuffix("\\") + " "
        if not stripped.endswith("\\"):
            out.append(buf.strip())
            buf = ""
    return out


def entry_point(tokens: list[str]) -> tuple[str, list[str]] | None:
    """``(entry point, its arguments)`` of a command line, or None when it runs none of ours."""
    for i, tok in enumerate(tokens):
        name = Path(tok).name
        if name in RUNNER_SCRIPTS:
            return RUNNER_SCRIPTS[name], tokens[i + 1:]
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("bitfit_tasks."):
            return tokens[i + 1].removeprefix("bitfit_tasks."), tokens[i + 2:]
        if tok == "bitfit-delta":
            return "cli", tokens[i + 1:]
    return None


def parse_command(line: str) -> str | None:
    """None when ``line`` parses with its entry point's parser (or runs none of ours), else why not."""
    tokens = [t for t in tokens_of(line) if t != "..."]
    found = entry_point(tokens)
    if found is None:
        return None
    entry, args = found
    if entry in sweep.RUNNERS and len(args) == 1 and args[0].endswith(".json"):
        return None  # one JSON file of arguments (parsed by HfArgumentParser.parse_dict at run time)
    parsers = {"sweep": sweep.build_parser, "analysis": analysis.build_parser, "cli": cli.build_parser}
    try:
        if entry in sweep.RUNNERS:
            runner_parser(entry).parse_args(args)
        elif entry in parsers:
            ns = strict(parsers[entry]()).parse_args(args)
            if entry == "sweep":  # the arguments after '--' go to every run: the runner's parser reads them
                runner_parser(ns.runner).parse_args(sweep.split_runner_args(ns.runner_args))
        else:
            return f"unknown entry point bitfit_tasks.{entry}"
    except SystemExit:
        return f"{entry}'s parser refuses it"
    return None


def documented_commands() -> list[tuple[str, str]]:
    return [(f"{doc.relative_to(ROOT)}", line) for doc in DOCS if doc not in NOT_COMMANDS
            for line in code_lines(doc.read_text())
            if entry_point(tokens_of(line)) is not None]


def test_the_docs_show_commands_of_every_entry_point():
    entries = {entry_point(tokens_of(line))[0] for _, line in documented_commands()}
    assert {"glue", "pos", "squad", "sweep", "analysis", "cli"} <= entries


@pytest.mark.parametrize(("doc", "line"), documented_commands())
def test_documented_command_parses(doc, line, capsys):
    why = parse_command(line)
    assert why is None, f"{doc}: {line!r}: {why}: {capsys.readouterr().err.strip().splitlines()[-1:]}"


def test_every_documented_flag_exists():
    known = known_flags()
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        spans = re.findall(r"`([^`]+)`", text) + code_lines(text)
        for span in spans:
            for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span):
                if flag not in known:
                    missing.append(f"{doc.relative_to(ROOT)}: {flag}")
    assert not missing, sorted(set(missing))


def test_the_checks_catch_a_renamed_flag():
    """What a rename looks like to these tests: the command no longer parses, the flag is unknown."""
    assert parse_command("python run_glue.py --task_name rte --train_eval_sample 0") is not None
    assert parse_command("python -m bitfit_tasks.sweep --tasks rte --output_dir x -- --no_such_flag 1") is not None
    assert parse_command("python run_glue.py --task_name rte --train_eval_samples 0") is None
    assert "--train_eval_sample" not in known_flags()


def test_architecture_table_matches_the_code():
    import subprocess
    import sys

    table = subprocess.run([sys.executable, str(ROOT / "docs" / "module_graph.py")], capture_output=True, text=True,
                           check=True).stdout
    text = (ROOT / "docs" / "architecture.md").read_text()
    shown = text.split("<!-- module table: python docs/module_graph.py -->\n", 1)[1].split("<!-- end of module table -->")[0]
    assert shown == table, "docs/architecture.md is stale: regenerate its table with python docs/module_graph.py"
