"""The storage layer against a real S3 server (MinIO from the cluster harness)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from finetune_api import layout
from finetune_api.constants import MANIFEST_FILE, Env, StorageEnv
from finetune_trainer import storage
from finetune_trainer.storage import StorageError
from harness.cluster import MinioServer

pytestmark = pytest.mark.cluster

MiB = 2**20


def use(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def new_bucket() -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.resolve(f"s3://{name}")
    fs.mkdir(name)
    return name


@pytest.fixture
def s3(minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's MinIO, with the AWS_* environment set."""
    use(monkeypatch, minio_env)
    return new_bucket()


def write_files(root: Path, sizes: dict[str, int]) -> Path:
    for i, (rel, size) in enumerate(sizes.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        block = hashlib.sha256(f"{rel}{i}".encode()).digest() * (MiB // 32)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= min(left, len(block))
    return root


def test_publish_verify_fetch_roundtrip(s3: str, tmp_path: Path) -> None:
    src = write_files(
        tmp_path / "src",
        {"adapter_config.json": 40, "adapter_model.safetensors": 3 * MiB, "tok/tokenizer.json": 5000},
    )
    uri = f"s3://{s3}/jobs/one"
    manifest, artifact = storage.publish(src, uri, kind="artifact", step=12)

    fs, root = storage.resolve(uri)
    stored = fs.cat_file(f"{root}/{MANIFEST_FILE}")
    assert artifact.sha256 == hashlib.sha256(stored).hexdigest()
    assert artifact.size_bytes == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert storage.read_manifest(uri) == manifest
    assert storage.verify(uri) == manifest
    assert storage.artifact_of(uri) == artifact

    local = storage.fetch(uri, tmp_path / "down")
    for entry in manifest.files:
        assert hashlib.sha256((local / entry.path).read_bytes()).hexdigest() == entry.sha256
    one = storage.fetch(f"{uri}/tok/tokenizer.json", tmp_path / "file")
    assert one.read_bytes() == (src / "tok/tokenizer.json").read_bytes()

    # Damage an object: verification names it.
    fs.pipe_file(f"{root}/tok/tokenizer.json", b"x" * 5000)
    with pytest.raises(storage.IntegrityError, match=r"tok/tokenizer\.json"):
        storage.verify(uri)


def test_manifest_is_the_last_object_and_large_files_go_in_parts(s3: str, tmp_path: Path) -> None:
    sizes = {f"shard-{i}.bin": 2 * MiB for i in range(6)} | {
        "big.safetensors": 3 * storage.MULTIPART_CHUNK_BYTES
    }
    src = write_files(tmp_path / "src", sizes)
    uri = f"s3://{s3}/atomic"
    fs, root = storage.resolve(uri)
    watcher, _ = storage.resolve(uri)
    snapshots: list[set[str]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                snapshots.append({p[len(root) + 1 :] for p in watcher.find(root)})
            except FileNotFoundError:
                snapshots.append(set())

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        manifest, _ = storage.publish(src, uri, kind="artifact")
    finally:
        done.set()
        poller.join()

    everything = set(sizes) | {MANIFEST_FILE}
    with_manifest = [s for s in snapshots if MANIFEST_FILE in s]
    assert all(s == everything for s in with_manifest), "manifest visible before all files"
    assert any(MANIFEST_FILE not in s and s for s in snapshots), "the poller never saw the upload in progress"
    times = {p[len(root) + 1 :]: info["LastModified"] for p, info in fs.find(root, detail=True).items()}
    assert times[MANIFEST_FILE] >= max(times.values())
    # A multipart upload's ETag is "<md5 of part md5s>-<number of parts>".
    etag = fs.info(f"{root}/big.safetensors")["ETag"].strip('"')
    assert etag.endswith("-3"), etag
    assert storage.verify(uri) == manifest


def test_wrong_credentials_fail_fast_and_permanently(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "definitely-not-the-secret-9f2c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    src = write_files(tmp_path / "src", {"a.bin": 100})
    uri = f"s3://{s3}/denied"
    for op in (lambda: storage.check_writable(uri), lambda: storage.publish(src, uri, kind="artifact")):
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            op()
        assert time.monotonic() - started < 10, "retried a permanent error"
        assert err.value.permanent
        assert f"s3://{s3}/denied" in str(err.value)
        assert wrong not in str(err.value) and wrong not in repr(err.value.__cause__)
        assert "access denied" in str(err.value).lower() or "signature" in str(err.value).lower()


def test_missing_bucket_fails_permanently_naming_the_uri(
    minio_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, minio_env)
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    src = write_files(tmp_path / "src", {"a.bin": 100})
    for op in (
        lambda: storage.check_writable(uri),
        lambda: storage.publish(src, uri, kind="artifact"),
        lambda: storage.list_complete_checkpoints(f"{uri}/checkpoints"),
        lambda: storage.fetch(f"{uri}/model", tmp_path / "m"),
    ):
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            op()
        assert time.monotonic() - started < 10
        assert err.value.permanent and uri.split("/")[2] in str(err.value)
        assert minio_env["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_checkpoint_listing_and_pruning_on_s3(s3: str, tmp_path: Path) -> None:
    ckpts = f"s3://{s3}/out/checkpoints"
    for step in (3, 6, 9):
        storage.publish(
            write_files(tmp_path / f"s{step}", {"w.bin": 1000 + step}),
            layout.step_uri(ckpts, step),
            kind="checkpoint",
            step=step,
        )
    fs, root = storage.resolve(ckpts)
    fs.pipe_file(f"{root}/step-12/w.bin", b"partial")  # an upload cut short
    assert [s for s, _ in storage.list_complete_checkpoints(ckpts)] == [3, 6, 9]
    storage.prune_checkpoints(ckpts, keep=1)
    assert storage.list_complete_checkpoints(ckpts) == [(9, f"{ckpts}/step-9")]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root)) == ["step-12", "step-9"]


# --- MinIO goes away in the middle of an upload ------------------------------------------


@pytest.fixture
def own_minio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MinioServer]:
    """A MinIO of this test alone (it gets stopped), with the AWS_* environment pointing at it."""
    server = MinioServer(tmp_path / "minio")
    server.start()
    try:
        server.wait_ready()
        use(monkeypatch, server.env)
        yield server
    finally:
        server.stop()


class StopOnFirstUpload(logging.Handler):
    """Stops MinIO right after the first file of a publish has landed (inside the upload thread)."""

    def __init__(self, server: MinioServer, restart_after: float | None) -> None:
        super().__init__(logging.DEBUG)
        self.server, self.restart_after = server, restart_after
        self.stopped_at: float | None = None
        self.restarted = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stopped_at is None and record.getMessage().startswith("uploaded "):
            self.server.stop()
            self.stopped_at = time.monotonic()
            if self.restart_after is not None:
                threading.Timer(self.restart_after, self._restart).start()

    def _restart(self) -> None:
        self.server.start()
        self.server.wait_ready()
        self.restarted.set()


def publish_during_outage(server: MinioServer, tmp_path: Path, restart_after: float | None):  # type: ignore[no-untyped-def]
    bucket = new_bucket()
    src = write_files(tmp_path / "src", {f"part-{i}.bin": MiB for i in range(5)})
    uri = f"s3://{bucket}/out"
    handler = StopOnFirstUpload(server, restart_after)
    logger = logging.getLogger("finetune_trainer.storage")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        try:
            result: object = storage.publish(src, uri, kind="checkpoint", step=1)
        except StorageError as exc:
            result = exc
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert handler.stopped_at is not None, "MinIO was never stopped"
    return uri, result, handler


@pytest.mark.slow
def test_upload_survives_a_20s_outage(own_minio: MinioServer, tmp_path: Path) -> None:
    uri, result, handler = publish_during_outage(own_minio, tmp_path, restart_after=20)
    assert handler.restarted.is_set()
    assert not isinstance(result, Exception), f"publish failed despite the restart: {result}"
    assert time.monotonic() - handler.stopped_at >= 20  # it really waited the outage out
    manifest = storage.verify(uri)
    assert len(manifest.files) == 5


@pytest.mark.slow
def test_upload_during_a_long_outage_fails_cleanly(
    own_minio: MinioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=3, base_delay_s=0.2, max_delay_s=0.5))
    uri, result, _ = publish_during_outage(own_minio, tmp_path, restart_after=None)
    assert isinstance(result, StorageError), result
    assert not result.permanent and uri in str(result)
    own_minio.start()
    own_minio.wait_ready()
    assert storage.read_manifest(uri) is None  # files may be there, the manifest is not
    fs, root = storage.resolve(uri)
    assert 1 <= len(fs.find(root)) < 5


def test_credentials_mounted_as_files_are_read_from_there(
    minio_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's --credentials-as-files: the Secret's keys are files under Env.CREDENTIALS_DIR
    and none of them is in the environment; the trainer reads and uses the files."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    for key in StorageEnv.ALL:
        monkeypatch.delenv(key, raising=False)
        if key in minio_env:
            (creds / key).write_text(minio_env[key] + "\n")  # Secrets often end in a newline
    monkeypatch.setenv(Env.CREDENTIALS_DIR, str(creds))
    bucket = new_bucket()
    uri = f"s3://{bucket}/from-files"
    _, artifact = storage.publish(write_files(tmp_path / "src", {"a.bin": 1000}), uri, kind="artifact")
    assert storage.artifact_of(uri) == artifact

    # The file wins over the environment: a wrong secret there is refused, and never shown.
    wrong = "wrong-secret-from-the-file-7c1e"
    (creds / StorageEnv.SECRET_ACCESS_KEY).write_text(wrong)
    monkeypatch.setenv(StorageEnv.SECRET_ACCESS_KEY, minio_env[StorageEnv.SECRET_ACCESS_KEY])
    with pytest.raises(StorageError) as err:
        storage.check_writable(f"s3://{bucket}/denied")
    assert err.value.permanent and wrong not in str(err.value)


def test_unreadable_credentials_file_is_a_permanent_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    (creds / StorageEnv.ACCESS_KEY_ID).mkdir(parents=True)  # a directory where a file should be
    monkeypatch.setenv(Env.CREDENTIALS_DIR, str(creds))
    with pytest.raises(StorageError, match=f"cannot read storage credentials file {creds}/AWS_ACCESS_KEY_ID") as err:
        storage.resolve("s3://bucket/x")
    assert err.value.permanent
