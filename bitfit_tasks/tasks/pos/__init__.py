"""Token tagging (POS, chunking, NER): the runner (``run``, behind ``run_pos.py``), the readers
(``data``) and word-level encoding and scoring (``tagging``)."""
