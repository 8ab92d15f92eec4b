"""The ``-m`` entry point of Figure 1's bias-change analysis (the package's ``analysis``); the code is
:mod:`bitfit_tasks.experiments.analysis`."""

from .experiments.analysis import main

if __name__ == "__main__":
    from .utils.launch import run_cli

    run_cli(main)
