"""Experiments over the runners: resumable grids (``sweep``, ``cells``), the paper-style table
(``report``), the SQuAD curve (``plots``) and the bias-change analysis of Figure 1 (``analysis``).
Imports everything below it."""
