"""Datasets from the Hugging Face hub, for runs with internet (every default reads local files)."""

from __future__ import annotations

from ..utils.errors import UsageError, first_line


def load_hub_dataset(path: str, name: str | None = None, *, local_hint: str, **kwargs):
    """``datasets.load_dataset`` for a hub dataset; a failure (offline, unknown id) becomes one
    line naming the dataset and the flags that read local files instead."""
    import datasets

    try:
        return datasets.load_dataset(path, name, **kwargs)
    except Exception as err:  # datasets raises ConnectionError, OSError, DatasetNotFoundError, ...
        first = first_line(err)
        cfg = f" (config {name!r})" if name else ""
        raise UsageError(f"could not load the hub dataset {path!r}{cfg}: {type(err).__name__}: {first[:200]}. "
                         f"Without internet, give local files: {local_hint}.") from err
