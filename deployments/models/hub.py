"""Finding weight files on local disk. Serving never downloads: `avatar-serve download PROFILE`
fetches a profile's files beforehand, and everything here runs with `local_files_only=True`.

A source names either a local path (file or folder) or a Hugging Face repo id, read from the
huggingface_hub cache at `weights_dir` (None: the default cache).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from deployments.common.errors import MissingWeightsError


def resolve_file(repo: str | None, filename: str, weights_dir: str | None = None) -> Path:
    """A file of `repo` (or a local path when `repo` is None or a folder) -> local Path."""
    if repo is None or Path(repo).is_dir():
        path = Path(repo or ".") / filename if repo else Path(filename)
        if not path.is_file():
            raise MissingWeightsError(str(path))
        return path
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=weights_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, HFValidationError):
        raise MissingWeightsError(f"{repo}/{filename}") from None


def resolve_dir(path_or_repo: str, weights_dir: str | None = None,
                allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or the cached snapshot of a repo id -> local Path of its root."""
    if Path(path_or_repo).is_dir():
        return Path(path_or_repo)
    try:
        return Path(snapshot_download(path_or_repo, cache_dir=weights_dir, local_files_only=True,
                                      allow_patterns=allow_patterns))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, HFValidationError):
        raise MissingWeightsError(path_or_repo) from None
