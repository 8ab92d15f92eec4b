"""One sampler for every task: a seeded random selection of *examples* (sentences, sentence pairs,
questions), never a prefix. Training subsets come from the data seed (``--data_seed``, else
``--seed``), so every method trains on the same examples for a seed; evaluation subsets come from
one fixed seed, so every method and every seed is scored on the same examples."""

from __future__ import annotations

import numpy as np

#: The seed of every evaluation subset (``--max_eval_samples``), whatever --seed/--data_seed say.
EVAL_SAMPLE_SEED = 1234


def sample_indices(n_total: int, seed: int, *, k: int | None = None, fraction: float | None = None) -> list[int] | None:
    """Sorted indices of ``k`` examples (or ``round(fraction * n_total)``, at least 1, then at most
    ``k``) drawn without replacement with ``numpy.random.default_rng(seed)``; ``None`` means all."""
    size = n_total
    if fraction is not None:
        size = max(1, round(fraction * n_total))
    if k is not None:
        if k < 1:
            raise ValueError(f"sample size must be positive, got {k}.")
        size = min(size, k)
    if size >= n_total:
        return None
    return sorted(np.random.default_rng(seed).choice(n_total, size=size, replace=False).tolist())


def sample_list(items: list, seed: int, *, k: int | None = None, fraction: float | None = None) -> list:
    idx = sample_indices(len(items), seed, k=k, fraction=fraction)
    return items if idx is None else [items[i] for i in idx]
