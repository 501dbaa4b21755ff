"""A model and dataset cache shared by the jobs that mount it (a ReadWriteMany volume or a node path).

Off unless $FINETUNE_CACHE_DIR is set (the operator sets it when the chart turns the cache on).
Only remote sources are cached (``s3://``); local and ``pvc://`` paths are read in place.

Keys. An entry is keyed by its source and identity: the endpoint (without user info), the URI,
and every object under it with its ETag, version and size, as listed *with the job's own
credentials* at the time of the lookup. A changed object has another key, so it is never served
stale; the old entry ages out by LRU.

Layout under the root::

    entries/<key>/entry.json   what the entry holds: source, objects, each file's sha256 and size
    entries/<key>/data/...     the files, read-only
    locks/<key>.fill           exclusive while one process fills <key> (flock)
    locks/<key>.use            shared while a process uses <key>; eviction skips entries in use
    tmp/<key>.<pid>.<nonce>/   a fill in progress (never read)

Filling: under the key's fill lock, download into tmp/, verify (the source's manifest.json when
it has one, sizes against the listing, and a second listing that must be unchanged), write
entry.json last, then rename into entries/. A reader sees no entry or a whole one. flock locks
die with their process (and, on NFSv4, with the client's lease), so a pod killed half-way leaves
only a tmp folder that the next filler of that key removes; it never blocks the key. Different
keys have different locks, so jobs on different models do not wait for each other.

Reading: an entry's files are checked against entry.json; a mismatch or an unreadable entry.json
discards the entry with a warning and refetches it (outcome "refetched", reported in the
termination message). $FINETUNE_CACHE_VERIFY says how:
- ``stat`` (default): size, mtime and ctime of each file as recorded at fill time, when the fill
  had just verified its sha256; a file whose stat differs is re-hashed in full. Entries are
  read-only (0444) and nothing writes them after the fill: any write, chmod, replacement or
  ``utime`` through the filesystem changes ctime (which no caller can set back), so it is
  re-hashed. What only a full re-hash catches is a change below the filesystem (disk bit rot,
  a volume edited by another route); a hit then costs a stat per file instead of reading the
  whole model again (minutes for a 16 GB model).
- ``sha256``: every hit re-hashes every file (the paranoid setting);
- ``size``: sizes only.

Reading ahead: a trainer reads the model memory-mapped (transformers 5 keeps fp32 safetensors
weights as views of the file), so its bytes are read from disk at the first forward unless the
page cache holds them: on a node that has not read the entry lately (another node filled it, or
the page cache was reclaimed) that is the whole model, read in page faults at the first step.
`prefetch(uri)`, started by the entry point before the heavy imports, looks the model up in a
background thread and, on a hit, asks the kernel to read the entry's files into the page cache
(posix_fadvise WILLNEED, in chunks) while the process imports torch and friends. It is a hint
only: it holds no lock, fills nothing on a miss, and the run's own lookup (`Cache.get`) checks
the entry as always.

Eviction: least recently used entries first, until the cache fits $FINETUNE_CACHE_MAX_BYTES
(after each fill, and before it to make room). Entries in use by a running process are skipped.

Credentials: they stay in the environment and go to the storage layer only. entry.json records the
URI, the endpoint without user info, ETags and sizes; nothing else of the request.

Namespace rule: every lookup first lists the source with the job's own credentials; a job whose
credentials cannot read the source gets the same storage error as without the cache and is never
served the entry. Across namespaces the operator mounts a separate folder per namespace (subPath
= namespace) unless the platform sets the cache's scope to "cluster"; see the chart's modelCache.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from finetune_api.constants import MANIFEST_FILE, Env, ExitCode
from finetune_api.quantity import parse_bytes
from finetune_api.status import Manifest

from . import storage
from .errors import ConfigError

log = logging.getLogger(__name__)

Outcome = Literal["hit", "miss", "refetched"]
ENTRY_FILE = "entry.json"
DATA_DIR = "data"
#: Schema of entry.json; an entry written by another version is refetched, not misread.
#: (A file's "stat" was added within version 1: an entry without it is re-hashed in full.)
ENTRY_VERSION = 1
VERIFY_MODES = ("stat", "sha256", "size")
#: A changed source during a fill is retried this often before giving up.
FILL_ATTEMPTS = 3
CACHED_SCHEMES = ("s3://",)


class CacheError(storage.StorageError):
    """The cache folder cannot be used (not writable, full after eviction)."""


@dataclass(frozen=True)
class ObjectInfo:
    path: str  # relative to the URI (the file name for a single object)
    etag: str
    size: int
    version: str = ""


@dataclass(frozen=True)
class Source:
    """A remote URI and what it holds now, as the job's credentials see it."""

    uri: str
    endpoint: str
    single: bool
    objects: tuple[ObjectInfo, ...]

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def key(self) -> str:
        ident = {
            "uri": self.uri.rstrip("/"),
            "endpoint": self.endpoint,
            "single": self.single,
            "objects": [[o.path, o.etag, o.size, o.version] for o in self.objects],
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:40]


@dataclass
class Stats:
    """Counters of this process, read by the trainer's Prometheus collector."""

    hits: int = 0
    misses: int = 0
    discarded: int = 0
    evicted: int = 0
    size_bytes: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    #: URI -> bytes of its entry read ahead by `prefetch` (a hit found before the run's lookup).
    prefetched: dict[str, int] = field(default_factory=dict)


STATS = Stats()
_STATS_LOCK = threading.Lock()
#: Open `use` locks of this process: held until it exits, so eviction never removes an entry in use.
_IN_USE: dict[str, int] = {}


def _public_endpoint(url: str) -> str:
    """The endpoint URL without user info (an endpoint may carry user:password@)."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def enabled() -> bool:
    return bool(os.environ.get(Env.CACHE_DIR))


def cacheable(uri: str) -> bool:
    return uri.startswith(CACHED_SCHEMES)


def outcome(uri: str) -> Outcome | None:
    """How this process got `uri`: from the cache ("hit"), filled it ("miss"), or replaced a bad
    entry ("refetched"); None when it did not go through the cache."""
    return STATS.outcomes.get(uri.rstrip("/"))


#: Bytes per posix_fadvise(WILLNEED) call: for one larger range Linux reads only about one
#: readahead window (8 MiB of a 1.16 GB file on the test machine), so a file is advised in chunks.
READAHEAD_CHUNK = 8 * 2**20


def readahead(root: Path) -> int:
    """Ask the kernel to read every file under `root` (or the file `root`) into the page cache,
    without waiting for it; returns the bytes advised. No copy into this process: the reads run
    in the kernel while the caller goes on."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    advised = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # removed meanwhile (evicted): nothing to read ahead
            continue
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, READAHEAD_CHUNK):
                os.posix_fadvise(fd, offset, min(READAHEAD_CHUNK, size - offset), os.POSIX_FADV_WILLNEED)
            advised += size
        finally:
            os.close(fd)
    return advised


def prefetch(uri: str) -> threading.Thread | None:
    """Start reading `uri`'s cache entry ahead in a background thread (see "Reading ahead" above);
    None when the cache is off or does not cache `uri`. Never raises: the run's own lookup reports
    what is wrong (credentials, a missing source)."""
    if not (enabled() and cacheable(uri)):
        return None
    thread = threading.Thread(target=_prefetch, args=(uri,), name="model-cache-prefetch", daemon=True)
    thread.start()
    return thread


def _prefetch(uri: str) -> None:
    started = time.perf_counter()
    try:
        src = describe(uri)  # with the job's credentials, as the run's lookup will
        entry = Cache.from_env().entry_dir(src.key)
        if not (entry / ENTRY_FILE).is_file():
            log.info("model cache: %s not cached yet; the run fills the cache", uri)
            return
        advised = readahead(entry / DATA_DIR)
    except Exception as exc:  # a hint only; the run's lookup raises the real error
        log.info("model cache: no read-ahead of %s: %s", uri, exc)
        return
    with _STATS_LOCK:
        STATS.prefetched[uri.rstrip("/")] = advised
    log.info("model cache: reading %s ahead (%d bytes, entry %s; advised in %.2f s)", uri, advised,
             src.key[:12], time.perf_counter() - started)


def describe(uri: str) -> Source:
    """List `uri` with the current credentials: its objects with ETag, version and size."""
    fs, root = storage.resolve(uri)
    endpoint = _public_endpoint(str(getattr(fs, "endpoint_url", None) or ""))

    def info() -> dict[str, Any]:
        try:
            return dict(fs.info(root))
        except FileNotFoundError:
            storage._check_bucket(fs, root, uri)
            raise

    top = storage._retry("stat", uri, info)
    if top.get("type") != "directory":
        return Source(uri, endpoint, True, (_object(root.rsplit("/", 1)[-1], top),))
    found = storage._retry("list", uri, lambda: dict(fs.find(root, detail=True)))
    objects = tuple(sorted((_object(path[len(root) + 1 :], meta) for path, meta in found.items()),
                           key=lambda o: o.path))
    if not objects:
        raise storage.StorageError(f"{uri}: no objects under this prefix", uri=uri, permanent=True)
    return Source(uri, endpoint, False, objects)


def _object(rel: str, meta: dict[str, Any]) -> ObjectInfo:
    etag = str(meta.get("ETag") or meta.get("etag") or "").strip('"')
    return ObjectInfo(rel, etag, int(meta.get("size") or 0), str(meta.get("VersionId") or ""))


class Cache:
    """One cache root (the mounted volume)."""

    def __init__(self, root: Path, max_bytes: int | None = None, verify: str = "stat") -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        if verify not in VERIFY_MODES:
            raise ConfigError(f"{Env.CACHE_VERIFY}={verify!r}: expected one of {', '.join(VERIFY_MODES)}")
        self.verify = verify
        for sub in ("entries", "locks", "tmp", "trash"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CacheError(f"cache {self.root}: cannot create {sub}/: {exc}", uri=str(self.root),
                                 permanent=True) from None

    @classmethod
    def from_env(cls) -> Cache:
        raw = os.environ.get(Env.CACHE_MAX_BYTES, "").strip()
        budget = _budget(raw, Env.CACHE_MAX_BYTES) if raw else None
        return cls(Path(os.environ[Env.CACHE_DIR]), budget, os.environ.get(Env.CACHE_VERIFY) or "stat")

    # --- paths and locks ------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[bool]:
        """flock on locks/<name>; yields False when mode has LOCK_NB and the lock is taken."""
        fd = os.open(self.root / "locks" / name, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def _hold_use(self, key: str) -> None:
        """Mark `key` in use by this process until it exits (a shared lock eviction respects)."""
        if key in _IN_USE:
            return
        fd = os.open(self.root / "locks" / f"{key}.use", os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _IN_USE[key] = fd

    def release(self, key: str) -> None:
        fd = _IN_USE.pop(key, None)
        if fd is not None:
            os.close(fd)

    # --- lookup -----------------------------------------------------------------------------

    def get(self, uri: str, hold: bool = True) -> Path:
        """A local path for `uri`, from the cache or filled into it. With `hold`, the entry stays
        marked in use (safe from eviction) until this process exits."""
        src = describe(uri)  # with the job's credentials: access denied surfaces here, as without a cache
        key = src.key
        result: Outcome = "hit"
        path = self._valid(src, key, warn=False)
        if path is None:
            with self._flock(f"{key}.fill", fcntl.LOCK_EX):
                path = self._valid(src, key)  # filled by another process while we waited
                if path is None:
                    result = "refetched" if self._discard(key) else "miss"
                    path = self._fill(src, key)
        self._hold_use(key)
        if not self.entry_dir(key).is_dir():  # evicted between the check and the use lock: fill again
            self.release(key)
            return self.get(uri, hold)
        os.utime(self.entry_dir(key) / ENTRY_FILE)  # LRU clock
        with _STATS_LOCK:
            if result == "hit":
                STATS.hits += 1
            else:
                STATS.misses += 1
            STATS.outcomes[uri.rstrip("/")] = result
        log.info("model cache %s: %s (%d bytes, entry %s)", result, uri, src.size, key[:12])
        self.evict()  # while we still hold it: the entry just fetched is never the one evicted
        if not hold:
            self.release(key)
        return path

    def _data_path(self, src: Source, key: str) -> Path:
        data = self.entry_dir(key) / DATA_DIR
        return data / src.objects[0].path if src.single else data

    def _valid(self, src: Source, key: str, warn: bool = True) -> Path | None:
        """The entry's data path when it exists and matches its entry.json; None when absent.
        A damaged entry is left for _discard (under the fill lock)."""
        entry = self.entry_dir(key)
        if not entry.is_dir():
            return None
        problem = self._check(entry)
        if problem:
            if warn:
                log.warning("model cache: discarding entry %s of %s: %s; refetching", key[:12], src.uri, problem)
            return None
        return self._data_path(src, key)

    def _check(self, entry: Path) -> str | None:
        """Why an entry cannot be used, or None when its files match entry.json."""
        try:
            doc = json.loads((entry / ENTRY_FILE).read_text())
            files = doc["files"]
            if doc.get("version") != ENTRY_VERSION:
                return f"entry.json version {doc.get('version')}, expected {ENTRY_VERSION}"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable {ENTRY_FILE}: {exc}"
        data = entry / DATA_DIR
        try:
            listed = {f["path"] for f in files}
            present = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
            if listed != present:
                return f"files differ from {ENTRY_FILE} ({len(present)} present, {len(listed)} listed)"
            for f in files:
                path = data / f["path"]
                st = path.stat()
                if st.st_size != f["size"]:
                    return f"{f['path']}: {st.st_size} bytes, {ENTRY_FILE} says {f['size']}"
                rehash = self.verify == "sha256" or (self.verify == "stat" and _stat(st) != f.get("stat"))
                if rehash and storage.sha256_file(path) != f["sha256"]:
                    return f"{f['path']}: sha256 differs from {ENTRY_FILE}"
        except (OSError, KeyError, TypeError) as exc:  # removed or damaged while we read it
            return f"unreadable entry: {exc}"
        return None

    def _discard(self, key: str) -> bool:
        """Move a (damaged) entry out of the way; True when there was one. Under the fill lock."""
        entry = self.entry_dir(key)
        if not entry.exists():
            return False
        trash = self.root / "trash" / f"{key}.{uuid.uuid4().hex[:8]}"
        os.rename(entry, trash)  # atomic: readers see the old entry or none, never half of it
        shutil.rmtree(trash, ignore_errors=True)
        with _STATS_LOCK:
            STATS.discarded += 1
        return True

    # --- filling ----------------------------------------------------------------------------

    def _fill(self, src: Source, key: str) -> Path:
        """Download into tmp/, verify, write entry.json, rename into entries/. Under the fill lock."""
        for stale in (self.root / "tmp").glob(f"{key}.*"):
            # Left by a filler that died: we hold the key's lock, so nobody is writing there.
            log.info("model cache: removing %s, left by an interrupted fill", stale.name)
            shutil.rmtree(stale, ignore_errors=True)
        self.evict(incoming=src.size)
        for attempt in range(1, FILL_ATTEMPTS + 1):
            tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                data = tmp / DATA_DIR
                storage.fetch(src.uri, data)  # verified against the source's manifest.json, if any
                files = self._inventory(src, data)
                if describe(src.uri).key != key:
                    # The source changed while we copied it: this copy may mix old and new objects.
                    log.warning("model cache: %s changed during the fill (attempt %d); copying again",
                                src.uri, attempt)
                    continue
                for p in data.rglob("*"):
                    if p.is_file():
                        p.chmod(0o444)  # shared by later jobs: nobody edits an entry in place
                for f in files:  # after the chmod (it changes ctime): what a hit compares with
                    f["stat"] = _stat((data / f["path"]).stat())
                doc = {"version": ENTRY_VERSION, "uri": src.uri, "endpoint": src.endpoint, "single": src.single,
                       "objects": [o.__dict__ for o in src.objects], "files": files,
                       "filled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                _write_synced(tmp / ENTRY_FILE, json.dumps(doc, indent=1).encode())
                os.rename(tmp, self.entry_dir(key))
                _fsync_dir(self.root / "entries")
                return self._data_path(src, key)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise storage.StorageError(f"{src.uri}: changed during each of {FILL_ATTEMPTS} copies into the cache",
                                   uri=src.uri, permanent=False)

    @staticmethod
    def _inventory(src: Source, data: Path) -> list[dict[str, Any]]:
        """sha256 and size of every fetched file; sizes must match the listing."""
        expected = {o.path: o.size for o in src.objects}
        # storage.fetch has just hashed every file the source's manifest lists and found them
        # equal: take those sums instead of reading the whole model a second time.
        verified: dict[str, str] = {}
        manifest = data / MANIFEST_FILE
        if not src.single and manifest.is_file():
            verified = {f.path: f.sha256 for f in Manifest.model_validate_json(manifest.read_bytes()).files}
        files = []
        for p in sorted(q for q in data.rglob("*") if q.is_file()):
            rel = p.relative_to(data).as_posix()
            size = p.stat().st_size
            want = expected.get(rel)
            if want is not None and size != want:
                raise storage.StorageError(f"{src.uri}/{rel}: downloaded {size} bytes, listed {want}",
                                           uri=src.uri, permanent=False)
            files.append({"path": rel, "size": size, "sha256": verified.get(rel) or storage.sha256_file(p)})
        return files

    # --- eviction ---------------------------------------------------------------------------

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, size, key) of every entry, least recently used first."""
        out = []
        for entry in (self.root / "entries").iterdir():
            try:
                meta = entry / ENTRY_FILE
                size = sum(int(f["size"]) for f in json.loads(meta.read_text())["files"])
                out.append((meta.stat().st_mtime, size, entry.name))
            except (OSError, ValueError, KeyError, TypeError):
                out.append((0.0, _du(entry), entry.name))  # damaged: oldest, goes first
        return sorted(out)

    def usage(self) -> int:
        size = sum(s for _, s, _ in self.entries())
        with _STATS_LOCK:
            STATS.size_bytes = size
        return size

    def evict(self, incoming: int = 0) -> list[str]:
        """Remove least recently used entries not in use until the cache (plus `incoming`) fits."""
        if self.max_bytes is None:
            self.usage()
            return []
        removed: list[str] = []
        with self._flock("evict", fcntl.LOCK_EX):
            entries = self.entries()
            total = sum(s for _, s, _ in entries) + incoming
            for _, size, key in entries:
                if total <= self.max_bytes:
                    break
                if key in _IN_USE:
                    # Checked before opening its lock file: on NFS, flock is a POSIX lock, and
                    # closing any descriptor of the file would drop this process's own use lock.
                    continue
                with self._flock(f"{key}.use", fcntl.LOCK_EX | fcntl.LOCK_NB) as free, \
                        self._flock(f"{key}.fill", fcntl.LOCK_EX | fcntl.LOCK_NB) as idle:
                    if not (free and idle):
                        continue
                    trash = self.root / "trash" / f"{key}.{uuid.uuid4().hex[:8]}"
                    os.rename(self.entry_dir(key), trash)
                shutil.rmtree(trash, ignore_errors=True)
                total -= size
                removed.append(key)
                log.info("model cache: evicted %s (%d bytes, least recently used)", key[:12], size)
            if total > self.max_bytes:
                log.warning("model cache: %d bytes needed, budget %d: the rest is in use", total, self.max_bytes)
        with _STATS_LOCK:
            STATS.evicted += len(removed)
        self.usage()
        return removed


def _budget(value: str, what: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _stat(st: os.stat_result) -> list[int]:
    """What `stat` verification compares: size, mtime and ctime in nanoseconds."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fetch(uri: str) -> Path:
    """`uri` through the cache configured in the environment."""
    return Cache.from_env().get(uri)


# --- Prometheus ------------------------------------------------------------------------------


class Collector:
    """Exports the cache counters of this process (registered by metrics.TrainerMetrics)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        n = self.names
        yield GaugeMetricFamily(n["cache_size"], "Bytes held by the model cache (all entries).",
                                value=STATS.size_bytes)
        for name, help_text, value in (
            ("cache_hits", "Sources this run read from the model cache.", STATS.hits),
            ("cache_misses", "Sources this run fetched into the model cache.", STATS.misses),
            ("cache_discarded", "Damaged cache entries discarded and refetched.", STATS.discarded),
            ("cache_evicted", "Cache entries this run evicted (least recently used).", STATS.evicted),
        ):
            yield CounterMetricFamily(n[name].removesuffix("_total"), help_text, value=value)


# --- `finetune cache` --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """`finetune cache warm URI...`: fill the cache ahead of jobs (the chart runs it as a Job)."""
    parser = argparse.ArgumentParser(prog="finetune cache", description="The shared model and dataset cache.")
    sub = parser.add_subparsers(dest="action", required=True)
    warm = sub.add_parser("warm", help="Fill the cache with these s3:// sources before jobs need them.")
    warm.add_argument("uris", nargs="+", metavar="URI")
    warm.add_argument("--dir", help=f"Cache root (default ${Env.CACHE_DIR}).")
    warm.add_argument("--max-bytes", help=f"Size budget, e.g. 500Gi (default ${Env.CACHE_MAX_BYTES}).")
    usage = sub.add_parser("usage", help="Print the entries (least recently used first) and the total size.")
    usage.add_argument("--dir", help=f"Cache root (default ${Env.CACHE_DIR}).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "dir", None):
        os.environ[Env.CACHE_DIR] = args.dir
    if getattr(args, "max_bytes", None) is not None:
        os.environ[Env.CACHE_MAX_BYTES] = str(args.max_bytes)
    if not enabled():
        print(f"finetune cache: no cache: set ${Env.CACHE_DIR} or --dir", file=sys.stderr)
        return 2
    try:
        cache = Cache.from_env()
        if args.action == "usage":
            for used, size, key in cache.entries():
                print(f"{key}  {size:>14d}  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(used))}")
            print(f"total {cache.usage()} bytes")
            return 0
        bad = [u for u in args.uris if not cacheable(u)]
        if bad:
            print(f"finetune cache warm: {bad[0]}: only {', '.join(CACHED_SCHEMES)} sources are cached "
                  "(local and pvc:// paths are read in place)", file=sys.stderr)
            return 2
        for uri in args.uris:
            path = cache.get(uri, hold=False)
            print(f"{uri}: {outcome(uri)} ({path})")
    except storage.StorageError as exc:
        print(f"finetune cache {args.action}: {exc}", file=sys.stderr)
        return ExitCode.PERMANENT if exc.permanent else 1
    except ConfigError as exc:
        print(f"finetune cache {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0
