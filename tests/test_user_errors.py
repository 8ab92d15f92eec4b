"""One line for what the user can fix, a traceback for everything else: ``launch.run_cli`` prints the
package's user-error type (and the library errors deliberately translated into it) as one line, and
lets any other exception -- an internal bug, even a ``ValueError`` or ``OSError`` -- keep its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from test_bad_input import CASES, no_model_loading

from bitfit_tasks.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cid, fn", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_every_bad_input_is_a_user_error(cid, fn, tmp_path):
    """Each case of the bad-input battery raises the type run_cli prints as one line (argparse's own
    exits aside), so none of them turns into a traceback."""
    with no_model_loading():
        try:
            fn(tmp_path)
        except SystemExit:  # argparse choices: argparse printed its own one-line message
            return
        except Exception as err:  # noqa: BLE001 -- the type is what is checked
            assert isinstance(err, UsageError), f"{cid}: {type(err).__name__}: {err}"
            return
    raise AssertionError(f"{cid}: no error raised")


# A runner whose main() fails the way the case names: a user error, or a bug that happens to be a
# ValueError / OSError / KeyError.
SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from bitfit_tasks.utils.errors import UsageError
from bitfit_tasks.utils.launch import run_cli
kind = sys.argv[1]
def main():
    if kind == "usage":
        raise UsageError("--thing 3 is out of range; use 1 or 2.")
    if kind == "value":
        int("not a number")  # an internal bug
    if kind == "oserror":
        open("/nonexistent/internal/file")
    raise KeyError("internal")
run_cli(main)
"""


@pytest.mark.parametrize("kind, one_line", [("usage", True), ("value", False), ("oserror", False), ("key", False)])
def test_run_cli_prints_one_line_only_for_user_errors(kind, one_line, tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "BITFIT_DEBUG"}
    done = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    if one_line:
        assert done.stderr == ("runner.py: error: --thing 3 is out of range; use 1 or 2. (BITFIT_DEBUG=1 shows the "
                               "traceback)\n")
    else:
        assert "Traceback (most recent call last)" in done.stderr and "runner.py: error:" not in done.stderr


@pytest.mark.parametrize("runner", ["glue", "pos", "squad"])
def test_a_model_that_cannot_be_loaded_is_one_line(runner, tmp_path):
    """transformers' OSError for a missing folder or an unreachable hub id is translated where the model
    is loaded: one line naming the value, not a traceback."""
    import importlib

    main = importlib.import_module(f"bitfit_tasks.tasks.{runner}.run").main
    data = {"glue": ["--task_name", "rte", "--data_dir", f"{FIXTURES}/glue"],
            "pos": ["--train_file", f"{FIXTURES}/pos/conll2000.txt", "--validation_file",
                    f"{FIXTURES}/pos/conll2000.txt", "--tag_column", "1"],
            "squad": ["--train_file", f"{FIXTURES}/squad/official.json", "--validation_file",
                      f"{FIXTURES}/squad/flat.jsonl"]}[runner]
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(UsageError, match=rf"could not load --model_name_or_path '{missing}' \(OSError: .*\); pass a "
                                         r"local model folder, or a hub id"):
        main(["--model_name_or_path", missing, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *data])
