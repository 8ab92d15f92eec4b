"""Penn Treebank POS tagging with BitFit (or full FT / a baseline): word-level accuracy.

    python run_pos.py --treebank ../shared/data/pos/nltk_data/corpora/treebank.zip --output_dir runs/wsj
    python run_pos.py --train_file en_ewt-ud-train.conllu --validation_file en_ewt-ud-dev.conllu --output_dir runs/ewt
    python run_pos.py --train_file conll2000.zip::conll2000/train.txt \
        --validation_file conll2000.zip::conll2000/test.txt --output_dir runs/conll2000
"""

from __future__ import annotations

from bitfit_tasks.tasks.pos.run import main
from bitfit_tasks.utils.launch import run_cli

if __name__ == "__main__":
    run_cli(main)
