"""The grid command's ``-m`` entry point (the package's ``sweep``); the code is
:mod:`bitfit_tasks.experiments.sweep`."""

from .experiments.sweep import main

if __name__ == "__main__":
    from .utils.launch import run_cli

    run_cli(main)
