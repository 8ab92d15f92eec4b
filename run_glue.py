"""Fine-tune on a GLUE task with BitFit (or full FT / a baseline). `python run_glue.py` runs the offline demo.

    python run_glue.py --task_name rte --data_dir ../shared/data/glue --output_dir runs/rte --bias_terms qm2
    accelerate launch run_glue.py args.json
"""

from __future__ import annotations

from bitfit_tasks.tasks.glue.run import main
from bitfit_tasks.utils.launch import run_cli

if __name__ == "__main__":
    run_cli(main)
