"""The shared model and dataset cache (finetune_trainer.cache) against a real S3 server (MinIO).

Concurrency is tested with real processes (each its own flock holder), a crash with SIGKILL.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from finetune_api.constants import Env, ExitCode
from finetune_trainer import cache, storage
from finetune_trainer.cache import Cache
from finetune_trainer.errors import ConfigError

pytestmark = pytest.mark.cluster

MiB = 2**20
FINETUNE = Path(sys.executable).with_name("finetune")


@pytest.fixture
def s3(minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's MinIO, with the AWS_* environment set."""
    for key, value in minio_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.resolve(f"s3://{bucket}")
    fs.mkdir(bucket)
    return bucket


@pytest.fixture(autouse=True)
def _fresh_stats(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cache, "STATS", cache.Stats())
    yield
    for key in list(cache._IN_USE):
        os.close(cache._IN_USE.pop(key))


def put_model(bucket: str, name: str, tmp: Path, size: int = 3 * MiB, seed: str = "a") -> str:
    """A model-like prefix (config, weights, tokenizer) published with its manifest."""
    src = tmp / f"src-{name}-{seed}"
    (src / "tok").mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps({"name": name, "seed": seed}))
    block = (seed * 64).encode()
    (src / "model.safetensors").write_bytes((block * (size // len(block) + 1))[:size])
    (src / "tok" / "tokenizer.json").write_text(json.dumps({"vocab": [seed, name]}))
    uri = f"s3://{bucket}/models/{name}"
    storage.publish(src, uri, kind="artifact")
    return uri


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "entries").iterdir())


def child(code: str, root: Path, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    """A python process running `code` with the cache rooted at `root`."""
    script = textwrap.dedent(code)
    full = {**os.environ, **env, Env.CACHE_DIR: str(root)}
    return subprocess.Popen([sys.executable, "-c", script], env=full, stdout=open(out, "wb"),
                            stderr=subprocess.STDOUT)


def test_hit_returns_the_same_files_and_counts(s3: str, tmp_path: Path) -> None:
    uri = put_model(s3, "m", tmp_path)
    c = Cache(tmp_path / "cache")
    first = c.get(uri)
    assert cache.outcome(uri) == "miss"
    second = c.get(uri)
    assert cache.outcome(uri) == "hit"
    assert first == second
    assert (first / "tok" / "tokenizer.json").read_text() == json.dumps({"vocab": ["a", "m"]})
    assert (cache.STATS.hits, cache.STATS.misses) == (1, 1)
    assert cache.STATS.size_bytes == c.usage() > 3 * MiB
    assert len(entries(c.root)) == 1


def test_single_object_is_cached_as_a_file(s3: str, tmp_path: Path) -> None:
    fs, _ = storage.resolve(f"s3://{s3}")
    fs.pipe_file(f"{s3}/data/train.jsonl", b'{"text": "x"}\n')
    c = Cache(tmp_path / "cache")
    path = c.get(f"s3://{s3}/data/train.jsonl")
    assert path.name == "train.jsonl" and path.read_bytes() == b'{"text": "x"}\n'
    assert c.get(f"s3://{s3}/data/train.jsonl") == path and cache.outcome(f"s3://{s3}/data/train.jsonl") == "hit"


FILL = """
    import sys, time
    from pathlib import Path
    from finetune_trainer import cache
    start = Path(sys.argv[1])
    while not start.exists():
        time.sleep(0.001)
    path = cache.fetch(sys.argv[2])
    print("OUTCOME", cache.outcome(sys.argv[2]), path, flush=True)
"""


def test_two_processes_filling_the_same_entry_make_one_entry(s3: str, tmp_path: Path, minio_env: dict[str, str]) -> None:
    uri = put_model(s3, "big", tmp_path, size=24 * MiB)
    root = tmp_path / "cache"
    go = tmp_path / "go"
    procs = []
    for i in range(2):
        code = FILL.replace("sys.argv[1]", repr(str(go))).replace("sys.argv[2]", repr(uri))
        procs.append(child(code, root, minio_env, tmp_path / f"p{i}.log"))
    time.sleep(3)  # both imported and waiting at the start line
    go.touch()
    for p in procs:
        assert p.wait(timeout=180) == 0
    outs = [next(line for line in (tmp_path / f"p{i}.log").read_text().splitlines() if line.startswith("OUTCOME"))
            for i in range(2)]
    outcomes = sorted(o.split()[1] for o in outs)
    assert outcomes == ["hit", "miss"], outs
    assert len({o.split()[2] for o in outs}) == 1
    assert len(entries(root)) == 1
    assert list((root / "tmp").iterdir()) == []


SLOW_FILL = """
    import sys, time
    from pathlib import Path
    from finetune_trainer import cache, storage
    real = storage.fetch
    def slow(uri, local_dir):
        out = real(uri, local_dir)
        print("DOWNLOADED", flush=True)
        time.sleep(600)  # killed here: files on disk, entry never committed
        return out
    storage.fetch = slow
    cache.fetch(URI)
"""


def test_crash_during_fill_leaves_no_readable_entry(s3: str, tmp_path: Path, minio_env: dict[str, str]) -> None:
    uri = put_model(s3, "m", tmp_path)
    root = tmp_path / "cache"
    log = tmp_path / "crash.log"
    proc = child(SLOW_FILL.replace("URI", repr(uri)), root, minio_env, log)
    deadline = time.monotonic() + 120
    while "DOWNLOADED" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert entries(root) == []  # nothing readable
    assert len(list((root / "tmp").iterdir())) == 1  # the half-done fill, under a temporary name
    # The dead filler's lock died with it: the next process fills at once and clears the leftover.
    t = time.monotonic()
    path = Cache(root).get(uri)
    assert time.monotonic() - t < 60
    assert cache.outcome(uri) == "miss"
    assert (path / "config.json").exists()
    assert list((root / "tmp").iterdir()) == []


def test_changed_source_is_never_served_stale(s3: str, tmp_path: Path) -> None:
    uri = put_model(s3, "m", tmp_path, seed="a")
    c = Cache(tmp_path / "cache")
    old = c.get(uri)
    assert json.loads((old / "config.json").read_text())["seed"] == "a"
    put_model(s3, "m", tmp_path, seed="b")  # same URI, new bytes (new ETags)
    new = c.get(uri)
    assert cache.outcome(uri) == "miss"
    assert new != old
    assert json.loads((new / "config.json").read_text())["seed"] == "b"
    assert (new / "model.safetensors").read_bytes()[:1] == b"b"


def test_damaged_entry_is_discarded_and_refetched(s3: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = put_model(s3, "m", tmp_path)
    c = Cache(tmp_path / "cache")
    path = c.get(uri)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.chmod(0o644)
    weights.write_bytes(b"X" + good[1:])  # same size, one byte flipped
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.cache"):
        again = c.get(uri)
    assert cache.outcome(uri) == "refetched"
    assert (again / "model.safetensors").read_bytes() == good
    assert cache.STATS.discarded == 1
    assert any("discarding entry" in r.message and "sha256" in r.message for r in caplog.records)
    # A broken entry.json is discarded the same way.
    (path.parent / "entry.json").write_text("{not json")
    c.get(uri)
    assert cache.outcome(uri) == "refetched" and cache.STATS.discarded == 2


def test_a_hit_reads_no_file_when_nothing_changed_since_the_fill(s3: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    uri = put_model(s3, "m", tmp_path, size=8 * MiB)
    Cache(tmp_path / "cache").get(uri)
    hashed: list[str] = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    Cache(tmp_path / "cache").get(uri)  # default: stats as recorded at fill time, no re-hash
    assert cache.outcome(uri) == "hit" and hashed == []
    Cache(tmp_path / "cache", verify="sha256").get(uri)  # FINETUNE_CACHE_VERIFY=sha256: every file
    assert cache.outcome(uri) == "hit" and "model.safetensors" in hashed


def test_a_changed_byte_whose_stat_was_put_back_is_caught_by_a_full_verify(s3: str, tmp_path: Path) -> None:
    """Restoring size and mtime does not hide a write (ctime moves, so the default re-hashes);
    only a change below the filesystem keeps every stat, and FINETUNE_CACHE_VERIFY=sha256 is the
    setting that catches that one."""
    uri = put_model(s3, "m", tmp_path)
    path = Cache(tmp_path / "cache").get(uri)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    before = weights.stat()
    weights.chmod(0o644)
    weights.write_bytes(b"X" + good[1:])
    weights.chmod(0o444)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as recorded
    assert Cache(tmp_path / "cache").get(uri) == path and cache.outcome(uri) == "refetched"
    assert weights.read_bytes() == good
    # Below the filesystem: the byte changes and entry.json's stats match the file (as if nothing
    # had written it); the default trusts the stats, a full verify does not.
    entry = path.parent / "entry.json"
    weights.chmod(0o644)
    weights.write_bytes(b"X" + good[1:])
    weights.chmod(0o444)
    doc = json.loads(entry.read_text())
    st = weights.stat()
    for f in doc["files"]:
        if f["path"] == "model.safetensors":
            f["stat"] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    entry.write_text(json.dumps(doc))
    Cache(tmp_path / "cache").get(uri)
    assert cache.outcome(uri) == "hit"
    Cache(tmp_path / "cache", verify="sha256").get(uri)
    assert cache.outcome(uri) == "refetched" and weights.read_bytes() == good


def test_verify_mode_is_checked() -> None:
    with pytest.raises(ConfigError, match="FINETUNE_CACHE_VERIFY='md5': expected one of stat, sha256, size"):
        Cache(Path("/nonexistent-not-created"), verify="md5")


def test_eviction_keeps_the_budget_least_recently_used_first(s3: str, tmp_path: Path) -> None:
    uris = {n: put_model(s3, n, tmp_path, size=4 * MiB) for n in ("a", "b", "c")}
    root = tmp_path / "cache"
    c = Cache(root, max_bytes=9 * MiB)  # two entries fit, not three
    keys = {}
    for n in ("a", "b"):
        c.get(uris[n], hold=False)
        keys[n] = cache.describe(uris[n]).key
    time.sleep(0.05)
    c.get(uris["a"], hold=False)  # a is now more recently used than b
    c.get(uris["c"], hold=False)
    keys["c"] = cache.describe(uris["c"]).key
    assert set(entries(root)) == {keys["a"], keys["c"]}
    assert c.usage() <= 9 * MiB
    assert cache.STATS.evicted == 1


def test_eviction_skips_entries_in_use(s3: str, tmp_path: Path, minio_env: dict[str, str]) -> None:
    uris = {n: put_model(s3, n, tmp_path, size=4 * MiB) for n in ("a", "b")}
    root = tmp_path / "cache"
    # Another process uses `a` (as a running job does: it holds the entry until it exits).
    log = tmp_path / "user.log"
    user = child(f"""
        import time
        from finetune_trainer import cache
        cache.fetch({uris['a']!r})
        print("USING", flush=True)
        time.sleep(600)
    """, root, minio_env, log)
    try:
        deadline = time.monotonic() + 120
        while "USING" not in log.read_text():
            assert user.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        c = Cache(root, max_bytes=5 * MiB)  # room for one
        c.get(uris["b"], hold=False)
        # `a` is older but in use: it stays, and the cache is over budget until it is released.
        assert cache.describe(uris["a"]).key in entries(root)
    finally:
        user.kill()
        user.wait()
    assert c.evict() == [cache.describe(uris["a"]).key]


def test_different_models_do_not_block_each_other(s3: str, tmp_path: Path) -> None:
    a, b = put_model(s3, "a", tmp_path), put_model(s3, "b", tmp_path)
    c = Cache(tmp_path / "cache")
    # Someone is filling `a` (its fill lock is held); `b` must not wait for it.
    fd = os.open(c.root / "locks" / f"{cache.describe(a).key}.fill", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t = time.monotonic()
        assert (c.get(b) / "config.json").exists()
        assert time.monotonic() - t < 60
    finally:
        os.close(fd)


def test_credentials_are_never_written_to_the_cache(s3: str, tmp_path: Path, minio_env: dict[str, str]) -> None:
    uri = put_model(s3, "m", tmp_path)
    root = tmp_path / "cache"
    Cache(root).get(uri)
    fs, _ = storage.resolve(f"s3://{s3}")
    fs.pipe_file(f"{s3}/data/d.jsonl", b"{}\n")
    Cache(root).get(f"s3://{s3}/data/d.jsonl")
    entry = json.loads(next((root / "entries").glob("*/entry.json")).read_text())
    assert entry["endpoint"] == minio_env["AWS_ENDPOINT_URL"]  # where it came from, and nothing of who asked
    secrets = [minio_env["AWS_SECRET_ACCESS_KEY"]]
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{secret!r} written into {path}"


def test_a_job_whose_credentials_cannot_read_the_source_is_not_served_the_entry(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace rule (cluster scope, one cache for all namespaces): an entry is served only
    to a job whose own credentials can list the source now. Namespace A's job fills the cache
    with its private model; namespace B's job, with B's credentials, gets the storage error it
    would get without the cache and no path into the entry."""
    uri = put_model(s3, "private", tmp_path)
    root = tmp_path / "cache"
    Cache(root).get(uri, hold=False)
    assert len(entries(root)) == 1
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "namespace-b")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "namespace-b-secret")
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=1))
    cache.STATS.outcomes.clear()
    with pytest.raises(storage.StorageError) as err:
        Cache(root).get(uri)
    assert err.value.permanent
    assert cache.outcome(uri) is None and cache.STATS.hits == 0


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a file just written) are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_prefetch_reads_a_hit_ahead_and_leaves_a_miss_to_the_run(s3: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """cache.prefetch (started by `finetune train` before its imports): on a miss it fills nothing
    (the run's own lookup fills, under the lock); on a hit it advises the entry's every byte and
    does not count as the run's lookup."""
    uri = put_model(s3, "m", tmp_path, size=16 * MiB)
    root = tmp_path / "cache"
    monkeypatch.setenv(Env.CACHE_DIR, str(root))
    thread = cache.prefetch(uri)
    assert thread is not None
    thread.join(120)
    assert not thread.is_alive() and cache.STATS.prefetched == {} and entries(root) == []
    path = Cache(root).get(uri, hold=False)
    assert cache.outcome(uri) == "miss"
    thread = cache.prefetch(uri)
    assert thread is not None
    thread.join(120)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert cache.STATS.prefetched == {uri: size} and size > 16 * MiB
    assert cache.outcome(uri) == "miss" and cache.STATS.hits == 0  # a hint, not a lookup
    assert cache.prefetch("/models/local") is None  # read in place: nothing to read ahead
    monkeypatch.delenv(Env.CACHE_DIR)
    assert cache.prefetch(uri) is None  # cache off


def test_readahead_brings_the_entry_into_the_page_cache(s3: str, tmp_path: Path) -> None:
    if shutil.which("fincore") is None:
        pytest.skip("util-linux fincore not installed: page cache residency cannot be read")
    uri = put_model(s3, "m", tmp_path, size=64 * MiB)
    weights = Cache(tmp_path / "cache").get(uri, hold=False) / "model.safetensors"
    _drop_pages(weights)
    if _resident_bytes(weights) > 8 * MiB:
        pytest.skip(f"{weights.parent}: this filesystem keeps its pages (tmpfs?): nothing to read ahead")
    assert cache.readahead(weights.parent) == sum(p.stat().st_size for p in weights.parent.rglob("*") if p.is_file())
    deadline = time.monotonic() + 30
    while _resident_bytes(weights) < weights.stat().st_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _resident_bytes(weights) >= weights.stat().st_size - 4096  # the last page may be partial


def test_prefetch_with_credentials_that_cannot_read_the_source_reads_nothing(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace rule holds for the read-ahead too: it lists the source with the job's own
    credentials first, so a job that cannot read it does not touch the entry (and no error
    escapes the thread: the run's own lookup reports it)."""
    uri = put_model(s3, "private", tmp_path)
    root = tmp_path / "cache"
    Cache(root).get(uri, hold=False)
    monkeypatch.setenv(Env.CACHE_DIR, str(root))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "namespace-b")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "namespace-b-secret")
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=1))
    thread = cache.prefetch(uri)
    assert thread is not None
    thread.join(120)
    assert not thread.is_alive() and cache.STATS.prefetched == {}


def test_cli_warm_fills_ahead_and_reports(s3: str, tmp_path: Path, minio_env: dict[str, str]) -> None:
    uri = put_model(s3, "m", tmp_path)
    root = tmp_path / "cache"
    env = {**os.environ, **minio_env}
    run = [str(FINETUNE), "cache", "warm", "--dir", str(root), uri]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"{uri}: miss" in first.stdout
    second = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert f"{uri}: hit" in second.stdout
    local = subprocess.run([str(FINETUNE), "cache", "warm", "--dir", str(root), "/models/x"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert local.returncode == 2 and "only s3:// sources are cached" in local.stderr
    missing = subprocess.run([str(FINETUNE), "cache", "warm", "--dir", str(root), f"s3://{s3}/nope"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == ExitCode.PERMANENT and "s3://" in missing.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_second_job_on_the_same_base_reads_it_from_the_cache(
    s3: str, tmp_path: Path, minio_env: dict[str, str], tiny_model_dir: Path, toy_data_dir: Path
) -> None:
    """Two `finetune train` runs (the pods' entry point) on one base model with one cache: the
    first fills it, the second reads it; each says so in its termination message (status.modelCache)
    and in its metrics."""
    from finetune_api.status import TerminationMessage

    storage.publish(tiny_model_dir, f"s3://{s3}/models/tiny", kind="artifact")
    fs, _ = storage.resolve(f"s3://{s3}")
    fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), f"{s3}/data/train.jsonl")
    root = tmp_path / "cache"
    for run in ("first", "second"):
        spec = {
            "model": {"uri": f"s3://{s3}/models/tiny"},
            "dataset": {"train": f"s3://{s3}/data/train.jsonl", "format": "prompt_completion",
                        "maxSeqLength": 64, "validationSplit": 0.25},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "hyperparameters": {"maxSteps": 2, "batchSize": 4, "seed": 7},
            "resources": {"gpusPerNode": 0},
            "output": {"uri": f"s3://{s3}/out/{run}"},
        }
        (tmp_path / f"{run}.json").write_text(json.dumps(spec))
        env = {**os.environ, **minio_env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
               Env.SPEC_PATH: str(tmp_path / f"{run}.json"), Env.TERMINATION_LOG: str(tmp_path / f"{run}.term"),
               Env.METRICS_PORT: "0", Env.CACHE_DIR: str(root), Env.CACHE_MAX_BYTES: "1Gi"}
        proc = subprocess.run([str(FINETUNE), "train"], env=env, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        msg = TerminationMessage.model_validate_json((tmp_path / f"{run}.term").read_bytes())
        assert msg.outcome == "succeeded"
        assert msg.model_cache == ("miss" if run == "first" else "hit"), proc.stderr[-2000:]
        assert "model cache " + ("miss" if run == "first" else "hit") in proc.stderr
        # startup.begin: a LoRA spec on one process loads neither library; the second run read
        # the cached model ahead while it imported.
        assert "start-up: not loading bitsandbytes, deepspeed" in proc.stderr
        assert (f"model cache: reading s3://{s3}/models/tiny ahead" in proc.stderr) == (run == "second")
    # Model and data set: one entry each, shared by both runs.
    assert len(entries(root)) == 2


def test_cache_metrics_are_exported(s3: str, tmp_path: Path) -> None:
    from finetune_trainer.metrics import NAMES, TrainerMetrics
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    uri = put_model(s3, "m", tmp_path)
    c = Cache(tmp_path / "cache")
    c.get(uri)
    c.get(uri)
    text = generate_latest(TrainerMetrics().registry).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[NAMES["cache_hits"]] == 1 and samples[NAMES["cache_misses"]] == 1
    assert samples[NAMES["cache_size"]] == c.usage() > 3 * MiB
