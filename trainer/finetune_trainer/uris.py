"""Turning the spec's source URIs into local paths.

Local URIs (`/abs`, `./relative`, `file:///abs`, and `pvc://claim/path`, mounted in the pod:
`finetune_api.layout.local_path` decides) are used in place; `s3://` goes through the storage
layer (`finetune_trainer.storage.fetch`), imported only when needed so that local runs do not
depend on it. Anything else is a Hugging Face id, read through the local cache.
"""

from __future__ import annotations

from pathlib import Path

from finetune_api import layout
from finetune_api.layout import is_local as is_local  # re-exported: the same function

from .errors import ConfigError

REMOTE_SCHEMES = ("s3://",)


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI (no existence check)."""
    path = layout.local_path(uri)
    if path is None:
        raise ConfigError(f"{uri}: not a local path")
    return Path(path)


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def hf_id(uri: str) -> str:
    return uri.removeprefix("hf://")


def fetch(uri: str, workdir: Path) -> Path:
    """A local copy of a remote (s3://) file or folder, through the storage layer."""
    try:
        from . import storage
    except ImportError as exc:  # pragma: no cover - storage ships with the trainer
        raise ConfigError(f"{uri}: remote URIs need finetune_trainer.storage: {exc}") from exc
    from . import cache

    if cache.enabled() and cache.cacheable(uri):
        return cache.fetch(uri)  # shared across jobs, keyed by the source's identity
    workdir.mkdir(parents=True, exist_ok=True)
    return Path(storage.fetch(uri, workdir))


def resolve(uri: str, workdir: Path) -> Path | None:
    """A local path for a local or remote URI; None for a Hugging Face id."""
    if is_local(uri):
        return local_path(uri)
    if is_remote(uri):
        return fetch(uri, workdir)
    return None
