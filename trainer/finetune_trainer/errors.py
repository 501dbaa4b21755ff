"""Errors the trainer distinguishes, and the exit code each maps to.

A PermanentError means retrying cannot help (bad spec, bad data, access denied): the pod exits
with ExitCode.PERMANENT and the Job's podFailurePolicy fails the whole job at once. Anything else
is treated as transient and exits with a retryable code.
"""

from __future__ import annotations

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


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ended a run."""
    if isinstance(exc, PermanentError):
        return ExitCode.PERMANENT
    if isinstance(exc, PermissionError):
        return ExitCode.PERMANENT
    # The storage layer decides itself whether a failure can heal (timeouts) or not (no bucket).
    if getattr(exc, "permanent", False) is True:
        return ExitCode.PERMANENT
    # 1 is retryable by the Job's podFailurePolicy (only PERMANENT fails the job at once).
    return 1


def is_permanent(exc: BaseException) -> bool:
    return exit_code_for(exc) == ExitCode.PERMANENT
