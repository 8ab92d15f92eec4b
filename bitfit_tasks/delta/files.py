"""A delta's files and where they live: the two file names, a local folder or a Hugging Face Hub
repository (downloaded with ``huggingface_hub``, as PEFT adapters are), and the upload of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..utils.errors import MissingFileError, UsageError, first_line

DELTA_WEIGHTS = "bitfit_delta.safetensors"
DELTA_CONFIG = "bitfit_delta.json"


def is_delta_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / DELTA_WEIGHTS).is_file() and (Path(path) / DELTA_CONFIG).is_file()


# What a delta repository on the Hub holds besides the two delta files: its card and tokenizer.
HUB_PATTERNS = [DELTA_WEIGHTS, DELTA_CONFIG, "README.md", "tokenizer*", "vocab*", "merges.txt",
                "special_tokens_map.json", "*.model"]


def resolve_delta_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                      cache_dir: str | None = None, token: str | bool | None = None,
                      local_files_only: bool = False) -> Path:
    """A local delta folder as is, otherwise a Hub repository id fetched with
    ``huggingface_hub.snapshot_download`` (the delta files, card and tokenizer only), which honours
    ``HF_HUB_OFFLINE``, the Hub cache and ``HF_TOKEN`` like every ``from_pretrained``."""
    p = Path(name_or_path)
    if p.exists():
        return p
    text = str(name_or_path)
    if p.is_absolute() or text.startswith(".") or text.count("/") > 1 or text.endswith("/"):
        raise MissingFileError(f"delta folder {text!r} does not exist (and it is not a Hub id, which looks like "
                                "user/name); check the path.")
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=str(name_or_path), revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, allow_patterns=HUB_PATTERNS)
    except HFValidationError:
        raise UsageError(f"delta {str(name_or_path)!r} is neither a local folder nor a Hub repository id "
                         "(user/name); check the path.") from None
    except (OSError, huggingface_hub.errors.HfHubHTTPError) as err:  # offline, unknown repo, no access
        first = first_line(err)
        raise UsageError(f"delta {str(name_or_path)!r}: not a local folder, and the Hub download failed "
                         f"({first[:160]}); pass a local delta folder, or check the id, --revision, HF_TOKEN "
                         "and the connection.") from None
    return Path(folder)


def upload_delta_folder(write: Any, repo_id: str, *, token: str | bool | None, private: bool | None,
                        revision: str | None, commit_message: str):
    """``write(folder)`` a delta into a temporary folder, then create the repository (if missing) and
    upload the folder in one commit: only the delta's own files, never a run's other outputs."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, token=token, revision=revision,
                                 repo_type="model", commit_message=commit_message)
