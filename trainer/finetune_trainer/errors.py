"""Errors the trainer distinguishes, and the exit code each maps to.

A PermanentError means retrying cannot help (bad spec, bad data, access denied): the pod exits
with ExitCode.PERMANENT and the Job's podFailurePolicy fails the whole job at once. Anything else
is treated as transient and exits with a retryable code.
"""

from __future__ import annotations

import errno
import socket

from finetune_api.constants import ExitCode, Reason


class TrainerError(Exception):
    """Base of the trainer's own errors; `reason` is a CamelCase status reason."""

    reason: str = Reason.FAILED


class PermanentError(TrainerError):
    """Retrying with the same spec and data cannot succeed."""

    reason = Reason.PERMANENT_ERROR


class DataError(PermanentError):
    """A dataset that cannot be read or does not match its declared format (names file, line, column)."""


class ConfigError(PermanentError):
    """A spec that validates but cannot be run (model missing, incompatible settings)."""

    reason = Reason.INVALID_SPEC


class TransientError(TrainerError):
    """Worth retrying: network, storage hiccups."""

    reason = Reason.STORAGE_ERROR


#: OSErrors of the local filesystem that no retry heals: the output (or a file under it) is on a
#: read-only filesystem, is a file where a folder is needed, or its name is too long.
_PERMANENT_ERRNOS = frozenset({errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                               errno.EACCES, errno.EPERM})
#: Failures to reach a host (a model hub, an object store): the network may come back.
_NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                             errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every one it was raised from or while handling (also `from None`)."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and not any(link is s for s in seen):
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen


def is_network_failure(exc: BaseException) -> bool:
    """Whether `exc` comes from failing to resolve or reach a host (DNS, refused, timed out, reset).

    Libraries wrap these in their own types (transformers: OSError "couldn't connect"; our loaders:
    ConfigError/DataError raised `from None`), so the whole chain is searched for the socket error.
    """
    for link in _chain(exc):
        if isinstance(link, socket.gaierror | ConnectionError | TimeoutError):
            return True
        if isinstance(link, OSError) and link.errno in _NETWORK_ERRNOS:
            return True
    return False


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ended a run."""
    # First: a hub or object store that cannot be reached now may be reachable on the next try,
    # even where a loader reported it as a bad model or dataset.
    if is_network_failure(exc):
        return 1
    if isinstance(exc, PermanentError):
        return ExitCode.PERMANENT
    if isinstance(exc, PermissionError):
        return ExitCode.PERMANENT
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return ExitCode.PERMANENT
    # The storage layer decides itself whether a failure can heal (timeouts) or not (no bucket).
    if getattr(exc, "permanent", False) is True:
        return ExitCode.PERMANENT
    # 1 is retryable by the Job's podFailurePolicy (only PERMANENT fails the job at once).
    return 1


def is_permanent(exc: BaseException) -> bool:
    return exit_code_for(exc) == ExitCode.PERMANENT
