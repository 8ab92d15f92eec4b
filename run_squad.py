"""SQuAD v1.1 with BitFit (or full FT / a baseline), on a fraction of the training questions.

    python run_squad.py --train_file ../shared/data/squad/train-v1.1.rebuilt.json \
        --validation_file ../shared/data/squad/dev-v1.1.rebuilt.json --train_fraction 0.1 --output_dir runs/sq10
    accelerate launch run_squad.py --train_fraction 0.1 ...   (hub: rajpurkar/squad)
"""

from __future__ import annotations

from bitfit_tasks.tasks.squad.run import main
from bitfit_tasks.utils.launch import run_cli

if __name__ == "__main__":
    run_cli(main)
