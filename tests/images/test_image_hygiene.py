"""The built images (`make images`) as a platform team would receive them.

Both run as the pods' non-root uid, carry the OCI labels, start their entry points, and hold nothing
of the machine that built them: no credentials or tokens, not the build host's extra CA certificates
(hack/images/build.sh mounts those into the build steps only), no uv or pip cache (a build-time
mount), none of the repository's tests, benchmarks or virtual environment (.dockerignore).

Sizes measured with `make images` on the stand-in Debian base (podman image inspect, 2026-12-01):
operator 388 MB (no torch; the published python slim base is smaller than the stand-in's 222 MB),
trainer 6.7 GB.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from finetune_api.constants import TRAINER_USER_ID
from harness.images import OPERATOR_IMAGE, REPO, TRAINER_IMAGE, podman, podman_env, require_image

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SOURCE_ROOMS = ("api", "cli", "operator", "trainer")
#: What .dockerignore lets into the build context: nothing else.
CONTEXT_ALLOWED = {"pyproject.toml", "README.md", *SOURCE_ROOMS}
#: The operator image's size limit: without torch it is a few hundred MB; torch alone would add GBs.
OPERATOR_MAX_BYTES = 600 * 10**6
#: Files that hold credentials wherever they are.
CREDENTIAL_NAMES = {".netrc", "_netrc", ".git-credentials", ".pypirc", "pip.conf", ".npmrc", ".dockercfg",
                    "id_rsa", "id_ecdsa", "id_ed25519", ".boto", ".s3cfg"}
CREDENTIAL_PATHS = (".docker/config.json", ".aws/credentials", ".aws/config", ".kube/config",
                    ".config/gcloud", "var/run/secrets/kubernetes.io", "run/secrets/kubernetes.io")
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|AWS_|HF_TOKEN", re.I)
#: Environment that would make the image trust a build host's certificates.
TRUST_ENV = {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
             "UV_NATIVE_TLS", "UV_SYSTEM_CERTS", "NODE_EXTRA_CA_CERTS"}

TAGS = pytest.mark.parametrize("tag", [OPERATOR_IMAGE, TRAINER_IMAGE], ids=["operator", "trainer"])
TITLES = {OPERATOR_IMAGE: "finetune-operator", TRAINER_IMAGE: "finetune-trainer"}


def config(tag: str) -> dict[str, object]:
    (inspected,) = json.loads(podman("image", "inspect", require_image(tag)).stdout)
    return dict(inspected)


def files(root: Path) -> Iterator[Path]:
    """Every regular file and symlink under root (relative paths; the tree is not followed through links)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield Path(dirpath, name).relative_to(root)


def pem_bodies(path: Path) -> set[str]:
    """The base64 bodies of the PEM certificates in a file, whitespace removed."""
    text = path.read_text(errors="replace")
    return {re.sub(r"\s", "", m) for m in re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----",
                                                        text, re.S)}


# ---- users, labels, entry points -------------------------------------------------------------------------

@TAGS
def test_runs_as_the_pods_non_root_uid(tag: str) -> None:
    """The chart's podSecurityContext and the trainer pods run as TRAINER_USER_ID; the image is that user."""
    cfg = config(tag)["Config"]
    assert isinstance(cfg, dict)
    assert cfg["User"] == f"{TRAINER_USER_ID}:{TRAINER_USER_ID}"
    out = podman("run", "--rm", "--network=none", "--entrypoint", "id", tag).stdout.strip()
    assert out == f"uid={TRAINER_USER_ID}(finetune) gid={TRAINER_USER_ID}(finetune) groups={TRAINER_USER_ID}(finetune)"


@TAGS
def test_oci_labels(tag: str) -> None:
    labels = config(tag)["Labels"]
    assert isinstance(labels, dict)
    oci = {k.removeprefix("org.opencontainers.image."): v for k, v in labels.items()
           if k.startswith("org.opencontainers.image.")}
    assert oci["title"] == TITLES[tag]
    assert oci["description"]
    assert oci["licenses"] == PYPROJECT["license"]
    assert oci["version"] == PYPROJECT["version"]
    assert re.fullmatch(r"https://\S+", oci["source"]), oci["source"]


@pytest.mark.parametrize("tag, command", [(OPERATOR_IMAGE, "operator"), (TRAINER_IMAGE, "train")],
                         ids=["operator", "trainer"])
def test_entry_point_starts(tag: str, command: str) -> None:
    """`finetune operator --help` / `finetune train --help` through the image's own ENTRYPOINT, read-only."""
    proc = podman("run", "--rm", "--network=none", "--read-only", require_image(tag), "--help", timeout=180)
    assert proc.stdout.startswith(f"usage: finetune {command} "), proc.stdout + proc.stderr


def test_operator_image_has_no_torch_and_stays_small(operator_rootfs: Path) -> None:
    site = next(operator_rootfs.glob("opt/venv/lib/python3*/site-packages"))
    heavy = sorted(p.name for p in site.iterdir() if re.match(r"(torch|nvidia|triton|deepspeed)", p.name, re.I))
    assert not heavy, f"the operator image carries {heavy}"
    proc = podman("run", "--rm", "--network=none", "--entrypoint", "python", OPERATOR_IMAGE, "-c",
                  "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('kopf') is not None)")
    assert proc.stdout.split() == ["None", "True"]
    size = config(OPERATOR_IMAGE)["Size"]
    assert isinstance(size, int) and size < OPERATOR_MAX_BYTES, f"operator image is {size} bytes"


def test_trainer_image_has_the_pinned_training_stack() -> None:
    extras = PYPROJECT["optional-dependencies"]
    pinned = (r.split("==") for r in extras["trainer"] + extras["deepspeed"] if "==" in r)
    pins = {name: version for name, version in pinned if name in {"torch", "transformers", "peft", "trl", "deepspeed"}}
    assert len(pins) == 5, pins
    script = f"import importlib.metadata as m, json; print(json.dumps({{n: m.version(n) for n in {sorted(pins)!r}}}))"
    proc = podman("run", "--rm", "--network=none", "--entrypoint", "python", require_image(TRAINER_IMAGE), "-c",
                  script, timeout=180)
    assert json.loads(proc.stdout) == pins


# ---- nothing of the build host ----------------------------------------------------------------------------

def test_no_credentials_tokens_or_trust_of_the_build_host(image_rootfs: tuple[str, Path]) -> None:
    tag, root = image_rootfs
    found = [str(p) for p in files(root)
             if p.name in CREDENTIAL_NAMES or any(str(p).startswith(c) or f"/{c}" in f"/{p}" for c in CREDENTIAL_PATHS)]
    assert not found, f"{tag} carries credential files: {found}"
    for d in ("var/run/secrets", "run/secrets", "etc/uv", "root/.config"):
        leftovers = [str(p) for p in files(root / d)] if (root / d).is_dir() else []
        assert not leftovers, f"{tag} carries {d}: {leftovers}"
    env = config(tag)["Config"]
    assert isinstance(env, dict)
    names = {e.split("=", 1)[0] for e in env.get("Env") or []}
    assert not {n for n in names if SECRET_ENV.search(n)}, names
    assert not names & TRUST_ENV, f"{tag} sets {names & TRUST_ENV}: build-host trust leaks into the image"
    # The build host's extra CAs (TLS is re-signed on the way out of these machines) were mounted into the
    # build steps only: no certificate file in the image holds one.
    extra_cas = root / "usr/local/share/ca-certificates"
    assert not (extra_cas.is_dir() and any(extra_cas.iterdir())), f"{tag} carries {list(extra_cas.iterdir())}"
    host_cas = set().union(*(pem_bodies(p) for p in Path("/usr/local/share/ca-certificates").glob("**/*.crt")))
    if host_cas:
        for rel in files(root):
            p = root / rel
            if p.suffix in {".crt", ".pem"} and not p.is_symlink() and p.is_file():
                assert not pem_bodies(p) & host_cas, f"{tag}: /{rel} holds a CA certificate of the build host"


def test_no_caches_sources_or_repository_files(image_rootfs: tuple[str, Path]) -> None:
    tag, root = image_rootfs
    everything = list(files(root))
    cached = [str(p) for p in everything if ".cache" in p.parts and p.parts[0] in {"root", "home"}]
    assert not cached, f"{tag} carries cache files (uv/pip caches are build-time mounts): {cached[:20]}"
    assert not (root / "src").exists(), f"{tag} keeps the build's /src"
    # Of the repository, only the installed packages: every file of them is a source file of the four
    # rooms (or its bytecode); no tests, bench, .venv, .tools, egg-info.
    site = next(root.glob("opt/venv/lib/python3*/site-packages"))
    site_rel = site.relative_to(root)
    packages = {p.name for room in SOURCE_ROOMS for p in (REPO / room).glob("finetune_*") if p.is_dir()}
    ours = [p.relative_to(site_rel) for p in everything
            if p.is_relative_to(site_rel) and p.relative_to(site_rel).parts[0] in packages]
    assert {p.parts[0] for p in ours} == packages, f"{tag}: the project's packages are not all in /{site_rel}"
    sources = {q.relative_to(REPO / room) for room in SOURCE_ROOMS for q in (REPO / room).rglob("*") if q.is_file()}
    for rel in ours:
        if rel.parts[-2:-1] == ("__pycache__",):
            assert (rel.parent.parent / (rel.name.split(".")[0] + ".py")) in sources, f"{tag}: stray bytecode {rel}"
        else:
            assert rel in sources, f"{tag}: /{site_rel / rel} is not a file of the source rooms"
    # Nothing else of the repository: no file whose path ends in one of the repository's paths outside the
    # source rooms (tests/harness/cluster.py, bench/run.py, ...), no .git/.venv/.tools folders.
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    elsewhere = {Path(t).parts for t in tracked if Path(t).parts[0] not in SOURCE_ROOMS and len(Path(t).parts) > 1
                 and Path(t).name not in {"__init__.py", "conftest.py"}}  # names any package may have
    strays = [str(p) for p in everything
              if any(p.parts[i:] in elsewhere for i in range(len(p.parts) - 1))
              or {".git", ".venv", ".tools"} & set(p.parts)]
    assert not strays, f"{tag} carries repository files: {strays[:20]}"


def test_dockerignore_lets_only_the_sources_into_the_context(tmp_path: Path) -> None:
    """Build the repository's context as the image builds see it (`COPY . /context` under .dockerignore)."""
    dockerfile = tmp_path / "Containerfile"
    dockerfile.write_text("FROM scratch\nCOPY . /context/\n")
    tag = f"localhost/finetune-context-check:{tmp_path.name.lower()[-20:]}"
    proc = subprocess.run(["buildah", "bud", "--isolation", "chroot", "-q", "-f", str(dockerfile), "-t", tag,
                           str(REPO)], capture_output=True, text=True, timeout=600,
                          env=podman_env())
    assert proc.returncode == 0, proc.stderr
    try:
        root = Path(podman("image", "mount", tag).stdout.strip()) / "context"
        try:
            context = set(files(root))
        finally:
            podman("image", "unmount", tag, check=False)
    finally:
        podman("rmi", "-f", tag, check=False)
    assert {p.parts[0] for p in context} <= CONTEXT_ALLOWED, sorted({p.parts[0] for p in context} - CONTEXT_ALLOWED)
    unwanted = [str(p) for p in context if "__pycache__" in p.parts or p.suffix == ".pyc"
                or any(part.endswith(".egg-info") for part in p.parts)]
    assert not unwanted, unwanted
    tracked = subprocess.run(["git", "ls-files", *SOURCE_ROOMS, "pyproject.toml", "README.md"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    missing = sorted(set(map(Path, tracked)) - context)
    assert not missing, f".dockerignore drops sources the images need: {missing[:20]}"
