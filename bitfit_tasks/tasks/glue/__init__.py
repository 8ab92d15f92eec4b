"""GLUE: the runner (``run``, behind ``run_glue.py``) and the data (``data``)."""
