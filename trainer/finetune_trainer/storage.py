"""One storage layer for models, datasets, checkpoints and artifacts.

URIs: ``s3://bucket/key`` (any S3-compatible endpoint, through s3fs), ``file:///abs``, plain
absolute or ``./relative`` paths, and ``pvc://claim/path`` (the claim mounted by the operator at
``finetune_api.constants.PVC_MOUNT_ROOT/claim``). Which URIs are local, and where checkpoints
live, is decided in ``finetune_api.layout`` (``is_local``, ``local_path``, ``step_uri``; the
first two are this module's too).

S3 endpoint, region and credentials come from the environment the operator fills from the
output's credentials Secret (``finetune_api.constants.StorageEnv``: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION), or, when the operator mounts that Secret as
files (``Env.CREDENTIALS_DIR`` set), from the files of those names there. They are handed to s3fs
only: never logged, never put in an exception message, a manifest or a return value.

Public API:

``StorageError(message, *, uri, permanent)``
    Every failure of this module (an ``errors.TrainerError``, reason StorageError). ``permanent``
    is True when retrying cannot help (no such bucket, access denied, not found, corrupt
    checkpoint); such errors are ``PermanentStorageError``, an ``errors.PermanentError`` (exit
    code 42). Transient errors (timeouts, 5xx, connection refused) are retried with exponential
    backoff first and raised with ``permanent=False``.
``IntegrityError(StorageError)``
    Stored bytes differ from the manifest, or the manifest is unreadable (permanent).
``resolve(uri) -> (fs, path)``
    The fsspec filesystem and the path inside it.
``fetch(uri, local_dir) -> Path``
    A local copy of a remote file or prefix (verified against its manifest when it has one);
    local URIs are returned as they are, without a copy.
``publish(local_dir, dest_uri, *, kind, step=None, spec=None, base_model=None, versions=None)``
    Uploads every file under ``local_dir`` (large files in parts), then ``manifest.json`` LAST,
    and returns ``(Manifest, Artifact)``; the Artifact's sha256 is that of the manifest's bytes.
    A prefix without manifest.json is incomplete and must never be reported.
``read_manifest(uri) -> Manifest | None``
``verify(uri) -> Manifest``
    Re-hashes every file the manifest lists; StorageError on a missing file or a mismatch.
``check_writable(uri)``
    Writes and deletes a probe object: fails fast (permanent) on a missing bucket or bad
    credentials before any training time is spent.
``list_complete_checkpoints(checkpoints_uri) -> [(step, uri)]``
    ``step-N`` prefixes that hold a manifest, sorted by step.
``prune_checkpoints(checkpoints_uri, keep)``
    Deletes all but the newest ``keep`` complete checkpoints, and incomplete ones older than the
    newest complete one (manifest removed first, so a half-deleted checkpoint is never complete).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import fsspec
from finetune_api.constants import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    Env,
    Reason,
    StorageEnv,
)
from finetune_api.layout import is_local as is_local  # re-exported: the same function
from finetune_api.layout import local_path, step_uri
from finetune_api.status import Artifact, FileEntry, Manifest
from fsspec.implementations.local import LocalFileSystem

from .errors import PermanentError, TrainerError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Part size of multipart uploads (S3's minimum part is 5 MiB); files of two parts or more go up
#: in parts, each retried by s3fs on its own.
MULTIPART_CHUNK_BYTES = 8 * 2**20
_HASH_BLOCK = 4 * 2**20
_STEP_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient errors: base, 2*base, 4*base... capped at max_delay_s."""

    attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 16.0

    def delay(self, attempt: int) -> float:
        # Jitter (75-100 %) so that many pods do not hammer a recovering endpoint in lockstep.
        backoff: float = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        return backoff * random.uniform(0.75, 1.0)


#: The policy every operation uses; about 35-50 s of retrying before a transient error surfaces.
RETRY = RetryPolicy()


class StorageError(TrainerError):
    """A storage operation failed. The message names the URI and never contains credentials.

    Constructed with permanent=True it is a PermanentStorageError, which is also an
    errors.PermanentError: the trainer exits with ExitCode.PERMANENT and the Job fails at once.
    """

    reason = Reason.STORAGE_ERROR

    def __new__(cls, *args: Any, **kwargs: Any) -> StorageError:
        if cls is StorageError and kwargs.get("permanent"):
            cls = PermanentStorageError
        return super().__new__(cls, *args)

    def __init__(self, message: str, *, uri: str, permanent: bool) -> None:
        super().__init__(_scrub(message))
        self.uri = uri
        self.permanent = permanent


class PermanentStorageError(StorageError, PermanentError):
    """No such bucket or key, access denied, a damaged prefix: retrying cannot help."""

    reason = Reason.STORAGE_ERROR


class IntegrityError(PermanentStorageError):
    """Stored bytes do not match their manifest (or the manifest is unreadable): a damaged prefix."""

    def __init__(self, message: str, *, uri: str) -> None:
        super().__init__(message, uri=uri, permanent=True)


def _read_setting(name: str) -> str | None:
    """The file `name` in Env.CREDENTIALS_DIR when that is set and has it (the Secret mounted as
    files), else the environment variable `name`. OSError when the file cannot be read."""
    folder = os.environ.get(Env.CREDENTIALS_DIR)
    if folder:
        try:
            return (Path(folder) / name).read_text().strip() or None
        except FileNotFoundError:
            pass  # an optional key (AWS_REGION, ...) the Secret does not have
    return os.environ.get(name) or None


def storage_setting(name: str) -> str | None:
    """A StorageEnv value, from the mounted credentials files or the environment."""
    try:
        return _read_setting(name)
    except OSError as exc:
        path = Path(os.environ.get(Env.CREDENTIALS_DIR, "")) / name
        raise StorageError(f"cannot read storage credentials file {path}: {exc.strerror}",
                           uri=str(path), permanent=True) from None


def _scrub(text: str) -> str:
    """Remove credential values from a text (defence in depth: error texts come from libraries)."""
    for name in StorageEnv.SECRETS:
        try:
            value = _read_setting(name)
        except OSError:  # unreadable: then the libraries never saw it either
            value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    return text


# --- URIs --------------------------------------------------------------------------------


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    import s3fs  # imported lazily: local runs need no boto stack

    client_kwargs: dict[str, Any] = {}
    # botocore retries little: this module's RETRY is the one policy, with a known total window.
    config_kwargs: dict[str, Any] = {
        "connect_timeout": 10,
        "read_timeout": 60,
        "retries": {"mode": "standard", "max_attempts": 2},
    }
    region = storage_setting(StorageEnv.REGION)
    if region:
        client_kwargs["region_name"] = region
    endpoint = storage_setting(StorageEnv.ENDPOINT_URL)
    if endpoint:
        # S3-compatible servers (MinIO, Ceph...) are addressed by path, not by bucket host name.
        config_kwargs["s3"] = {"addressing_style": "path"}
    return s3fs.S3FileSystem(
        key=storage_setting(StorageEnv.ACCESS_KEY_ID),
        secret=storage_setting(StorageEnv.SECRET_ACCESS_KEY),
        token=storage_setting(StorageEnv.SESSION_TOKEN),
        endpoint_url=endpoint,
        client_kwargs=client_kwargs,
        config_kwargs=config_kwargs,
        # Never serve a stale listing: completeness is decided by what is there now. Instances are
        # cached by fsspec per (credentials, endpoint), so changed credentials get a new client.
        use_listings_cache=False,
    )


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds `uri`, and the path inside it (no trailing slash)."""
    if uri.startswith("s3://"):
        path = uri.removeprefix("s3://").rstrip("/")
        if not path:
            raise StorageError(f"{uri}: no bucket in the URI", uri=uri, permanent=True)
        return _s3_filesystem(), path
    local = local_path(uri)
    if local is None:
        raise StorageError(
            f"{uri}: not a storage URI (expected s3://, file://, pvc:// or a local path)",
            uri=uri,
            permanent=True,
        )
    path = os.path.abspath(local)
    return LocalFileSystem(auto_mkdir=True), path


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# --- Errors and retries ------------------------------------------------------------------

# EROFS/EEXIST/ENOTDIR: a local output on a read-only filesystem, or a file where a folder must be.
_PERMANENT_ERRNOS = {errno.EINVAL, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENAMETOOLONG, errno.EROFS,
                     errno.EEXIST, errno.ENOTDIR}


def _is_permanent(exc: BaseException) -> bool:
    """Retrying cannot help: missing bucket/object, access denied, bad request, no credentials."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(
        exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError | ValueError
    ):
        return True
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return True
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) or 500)
        return 400 <= status < 500 and status not in (408, 429)
    if isinstance(exc, BotoCoreError):
        return False  # connection refused, timeouts, closed connections
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return True
    return False


def _describe(exc: BaseException) -> str:
    kind = {FileNotFoundError: "not found (no such bucket or key)", PermissionError: "access denied"}
    for cls, text in kind.items():
        if isinstance(exc, cls):
            return f"{text}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _retry(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run fn, retrying transient errors with backoff; raise StorageError naming `uri`."""
    for attempt in range(1, RETRY.attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            permanent = _is_permanent(exc)
            if permanent or attempt == RETRY.attempts:
                tried = "" if permanent else f" after {attempt} attempts"
                raise StorageError(
                    f"{what} {uri} failed{tried}: {_describe(exc)}", uri=uri, permanent=permanent
                ) from None  # the chained boto error is not needed and could echo request details
            delay = RETRY.delay(attempt)
            log.warning(
                "%s %s: transient error (attempt %d/%d), retrying in %.1fs: %s",
                what,
                uri,
                attempt,
                RETRY.attempts,
                delay,
                _scrub(_describe(exc)),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --- Manifests ---------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def manifest_bytes(manifest: Manifest) -> bytes:
    """The exact bytes written as manifest.json (the artifact's sha256 is taken over these)."""
    return (json.dumps(manifest.wire(), indent=2, sort_keys=True) + "\n").encode()


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    out = [(p.relative_to(local_dir).as_posix(), p) for p in files]
    # A stale manifest in the source folder would describe other files; ours is built fresh.
    return [(rel, p) for rel, p in out if rel != MANIFEST_FILE]


def _manifest_bytes(uri: str, check_bucket: bool) -> bytes | None:
    """manifest.json of a prefix as stored, or None when there is none (an incomplete prefix).

    `check_bucket`: a missing key in a missing bucket is a permanent error, not "incomplete".
    """
    fs, root = resolve(uri)
    path = f"{root}/{MANIFEST_FILE}"

    def load() -> bytes | None:
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            if check_bucket and not _is_local(fs):
                _check_bucket(fs, root, uri)
            return None

    return _retry("read manifest of", uri, load)


def _parse_manifest(uri: str, data: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValueError as exc:
        raise IntegrityError(f"{_join(uri, MANIFEST_FILE)} is not a valid manifest: {exc}", uri=uri) from None


def read_manifest(uri: str) -> Manifest | None:
    """The manifest of a prefix, or None when the prefix is incomplete (no manifest.json)."""
    data = _manifest_bytes(uri, check_bucket=True)
    return None if data is None else _parse_manifest(uri, data)


def _check_bucket(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> None:
    """Turn 'not found' on a key into a permanent error when the whole bucket is missing."""
    bucket = root.split("/", 1)[0]
    if not fs.exists(bucket):
        raise StorageError(f"{uri}: no such bucket {bucket!r} (or no access to it)", uri=uri, permanent=True)


# --- Publishing --------------------------------------------------------------------------


def publish(
    local_dir: Path,
    dest_uri: str,
    *,
    kind: Literal["artifact", "checkpoint"],
    step: int | None = None,
    spec: dict[str, Any] | None = None,
    base_model: dict[str, Any] | None = None,
    versions: dict[str, str] | None = None,
) -> tuple[Manifest, Artifact]:
    """Upload every file under local_dir to dest_uri, then manifest.json last."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(
            f"cannot publish {local_dir} to {dest_uri}: not a directory", uri=dest_uri, permanent=True
        )
    files = _local_files(local_dir)
    entries = [FileEntry(path=rel, sha256=sha256_file(p), size_bytes=p.stat().st_size) for rel, p in files]
    manifest = Manifest(
        kind=kind,
        files=entries,
        step=step,
        base_model=base_model or {},
        spec=spec or {},
        versions=versions or {},
        created_at=datetime.now(UTC),
    )
    fs, root = resolve(dest_uri)
    manifest_path = f"{root}/{MANIFEST_FILE}"

    # Re-publishing (a checkpoint saved again after a restart, an artifact trained again with
    # resume: never): the prefix stops being complete before any of its files change.
    def drop_old_manifest() -> bool:
        if fs.exists(manifest_path):
            fs.rm_file(manifest_path)
            return True
        return False

    replaced = _retry("prepare", dest_uri, drop_old_manifest)
    # A checkpoint's step-N prefix is ours alone; an artifact's prefix is when it held one before.
    # A folder that never held a manifest may be the user's own: its other files are left alone.
    if replaced or kind == "checkpoint":
        _remove_unlisted(fs, root, dest_uri, {e.path for e in entries}, keep_checkpoints=kind == "artifact")

    put_kwargs: dict[str, Any] = {} if _is_local(fs) else {"chunksize": MULTIPART_CHUNK_BYTES}
    for rel, path in files:
        target = f"{root}/{rel}"

        def upload(p: Path = path, t: str = target) -> None:
            fs.put_file(str(p), t, **put_kwargs)

        _retry("upload to", _join(dest_uri, rel), upload)
        log.debug("uploaded %s", _join(dest_uri, rel))

    # Every file must be there, at its full size, before the manifest says the prefix is complete.
    def check_uploaded() -> None:
        for entry in entries:
            size = fs.info(f"{root}/{entry.path}")["size"]
            if size != entry.size_bytes:
                raise OSError(errno.EIO, f"{entry.path} has {size} bytes, expected {entry.size_bytes}")

    _retry("check upload to", dest_uri, check_uploaded)

    data = manifest_bytes(manifest)
    _retry("write manifest to", dest_uri, lambda: _write_manifest(fs, manifest_path, data))
    artifact = Artifact(uri=dest_uri, sha256=hashlib.sha256(data).hexdigest(), size_bytes=manifest.size_bytes)
    log.info(
        "published %s: %d files, %d bytes, manifest sha256 %s",
        dest_uri,
        len(entries),
        artifact.size_bytes,
        artifact.sha256,
    )
    return manifest, artifact


def _remove_unlisted(
    fs: fsspec.AbstractFileSystem, root: str, uri: str, listed: set[str], *, keep_checkpoints: bool
) -> None:
    """Delete what an older artifact left under root that the new manifest will not list (a
    `merged/` no longer asked for, files of another method), so that a complete prefix holds
    exactly its manifest's files. An artifact's checkpoints/ is its own prefix (own manifests)."""

    def scan() -> list[str]:
        try:
            return [str(k) for k in fs.find(root)]
        except FileNotFoundError:
            return []

    stale = []
    for key in _retry("list", uri, scan):
        if not key.startswith(root + "/"):
            continue
        rel = key[len(root) + 1 :]
        if rel in listed or rel == MANIFEST_FILE or (keep_checkpoints and rel.startswith(CHECKPOINTS_DIR + "/")):
            continue
        stale.append(key)
    if not stale:
        return
    _retry("remove older files from", uri, lambda: fs.rm(stale))
    if _is_local(fs):
        # Folders the deleted files leave empty (object stores have none).
        for dirpath, _, _ in sorted(os.walk(root), key=lambda d: -len(d[0])):
            if dirpath != root and not os.listdir(dirpath):
                os.rmdir(dirpath)
    log.info("%s: removed %d files of an older artifact that the new manifest does not list", uri, len(stale))


def _write_manifest(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if _is_local(fs):
        # Temp file + rename: readers see no manifest or the whole manifest, never half of one.
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".tmp")
        try:
            # mkstemp makes the file 0600; the other files get the default mode (0666 less umask).
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)  # a single PUT: S3 objects appear atomically


def _umask() -> int:
    """The process umask (only readable by setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_file(uri: str, name: str) -> bytes | None:
    """One (small) file of a prefix, e.g. metrics.json of an artifact; None when it is absent."""
    fs, root = resolve(uri)
    path = f"{root}/{name}"

    def load() -> bytes | None:
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            return None

    return _retry("read", _join(uri, name), load)


def artifact_of(uri: str) -> Artifact | None:
    """The Artifact a complete prefix describes (sha256 of its manifest bytes), or None."""
    data = _manifest_bytes(uri, check_bucket=False)
    if data is None:
        return None
    manifest = _parse_manifest(uri, data)
    return Artifact(uri=uri, sha256=hashlib.sha256(data).hexdigest(), size_bytes=manifest.size_bytes)


def verify(uri: str) -> Manifest:
    """Re-hash every file the manifest lists; raise StorageError (permanent) on any difference."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise StorageError(f"{uri}: incomplete, no {MANIFEST_FILE}", uri=uri, permanent=True)
    fs, root = resolve(uri)
    for entry in manifest.files:
        file_uri = _join(uri, entry.path)

        def digest(path: str = f"{root}/{entry.path}") -> tuple[str, int]:
            h, size = hashlib.sha256(), 0
            with fs.open(path, "rb", block_size=_HASH_BLOCK) as f:
                while block := f.read(_HASH_BLOCK):
                    h.update(block)
                    size += len(block)
            return h.hexdigest(), size

        sha, size = _retry("verify", file_uri, digest)
        if sha != entry.sha256 or size != entry.size_bytes:
            raise IntegrityError(
                f"{file_uri}: sha256/size mismatch (manifest {entry.sha256[:12]}…/{entry.size_bytes} B, "
                f"stored {sha[:12]}…/{size} B)",
                uri=file_uri,
            )
    return manifest


def check_writable(uri: str) -> None:
    """Write and delete a small probe under uri: a missing bucket or bad credentials fail here."""
    fs, root = resolve(uri)
    if _is_local(fs) and os.path.exists(root) and not os.path.isdir(root):
        raise StorageError(f"{uri}: the output must be a folder; {root} exists and is not one", uri=uri, permanent=True)
    probe = f"{root}/.finetune-probe-{os.getpid()}-{random.randrange(1 << 30)}"

    def write_and_delete() -> None:
        if _is_local(fs):
            os.makedirs(root, exist_ok=True)  # the output folder stays, empty until published
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)

    _retry("write to", uri, write_and_delete)


# --- Fetching ----------------------------------------------------------------------------


def fetch(uri: str, local_dir: Path) -> Path:
    """A local path for uri: local URIs as they are; remote files/prefixes downloaded into local_dir."""
    fs, root = resolve(uri)
    if _is_local(fs):
        if not os.path.exists(root):
            raise StorageError(f"{uri}: no such file or directory", uri=uri, permanent=True)
        return Path(root)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)

    def info() -> dict[str, Any]:
        try:
            return dict(fs.info(root))
        except FileNotFoundError:
            _check_bucket(fs, root, uri)
            raise

    if _retry("stat", uri, info)["type"] != "directory":
        target = local_dir / root.rsplit("/", 1)[-1]
        _retry("download", uri, lambda: fs.get_file(root, str(target)))
        return target

    keys = _retry("list", uri, lambda: list(fs.find(root)))
    for key in keys:
        rel = key[len(root) + 1 :]
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)

        def download(k: str = key, t: Path = target) -> None:
            fs.get_file(k, str(t))

        _retry("download", _join(uri, rel), download)
    manifest_file = local_dir / MANIFEST_FILE
    if manifest_file.exists():
        _verify_local(Manifest.model_validate_json(manifest_file.read_bytes()), local_dir, uri)
    log.info("fetched %s (%d files) to %s", uri, len(keys), local_dir)
    return local_dir


def _verify_local(manifest: Manifest, local_dir: Path, uri: str) -> None:
    for entry in manifest.files:
        path = local_dir / entry.path
        if not path.is_file() or path.stat().st_size != entry.size_bytes or sha256_file(path) != entry.sha256:
            raise IntegrityError(f"{_join(uri, entry.path)}: download does not match the manifest", uri=uri)


# --- Checkpoints -------------------------------------------------------------------------


def _list_steps(checkpoints_uri: str) -> list[tuple[int, str, bool]]:
    """(step, uri, complete) of every step-N prefix, sorted by step."""
    fs, root = resolve(checkpoints_uri)

    def scan() -> list[tuple[int, str, bool]]:
        try:
            names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
        except FileNotFoundError:
            if not _is_local(fs):
                _check_bucket(fs, root, checkpoints_uri)
            return []
        found = []
        for name in names:
            if m := _STEP_RE.match(name):
                step = int(m.group(1))
                complete = bool(fs.exists(f"{root}/{name}/{MANIFEST_FILE}"))
                found.append((step, step_uri(checkpoints_uri, step), complete))
        return sorted(found)

    return _retry("list checkpoints in", checkpoints_uri, scan)


def list_complete_checkpoints(checkpoints_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of the step-N prefixes that hold a manifest, oldest first."""
    return [(step, uri) for step, uri, complete in _list_steps(checkpoints_uri) if complete]


def prune_checkpoints(checkpoints_uri: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; delete older complete and incomplete ones."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    steps = _list_steps(checkpoints_uri)
    complete = [step for step, _, ok in steps if ok]
    if not complete:
        return
    kept = set(complete[-keep:])
    newest = complete[-1]
    # Incomplete prefixes newer than the newest complete one may be uploads in progress.
    doomed = [(step, uri) for step, uri, _ in steps if step not in kept and step < newest]
    for step, uri in doomed:
        fs, root = resolve(uri)

        def delete(fs: fsspec.AbstractFileSystem = fs, root: str = root) -> None:
            manifest = f"{root}/{MANIFEST_FILE}"
            if fs.exists(manifest):
                fs.rm_file(manifest)  # first: never leave a "complete" checkpoint with files missing
            if fs.exists(root):
                fs.rm(root, recursive=True)

        _retry("delete checkpoint", uri, delete)
        log.info("pruned checkpoint step %d at %s", step, uri)
