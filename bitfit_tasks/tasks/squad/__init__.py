"""SQuAD v1.1: the runner (``run``, behind ``run_squad.py``), the data and windows (``data``) and the
span search with its QA trainer (``qa``)."""
