"""The project's two images as the tests see them: their tags and how to run podman on these machines.

`make images` (hack/images/build.sh) builds both tags. Podman always runs with
hack/images/containers.conf as CONTAINERS_CONF: container ulimits this machine allows and the runc
runtime (see that file). Tests that need an image call `require_image`, which fails rather than
skips: CI builds the images before the tests (`make test`), so a missing one is a broken build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest

REPO: Final = Path(__file__).resolve().parents[2]
CONTAINERS_CONF: Final = REPO / "hack" / "images" / "containers.conf"

OPERATOR_IMAGE: Final = "localhost/finetune-operator:dev"
TRAINER_IMAGE: Final = "localhost/finetune-trainer:dev"
IMAGES: Final = (OPERATOR_IMAGE, TRAINER_IMAGE)


def podman_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to run podman (or buildah) in: os.environ plus this project's CONTAINERS_CONF."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), **(extra or {})}


def podman(*args: str, check: bool = True, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS` with `podman_env()`, capturing text output.

    With check=True a non-zero exit raises an AssertionError carrying the command and its output.
    Other keyword arguments go to subprocess.run (env= is merged over podman_env(); output is captured
    unless stdout= or stderr= is given).
    """
    env = podman_env(kwargs.pop("env", None))
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs.setdefault("capture_output", True)
    proc = subprocess.run(["podman", *args], text=True, timeout=timeout, env=env, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout or ''}\n{proc.stderr or ''}"
        )
    return proc


def image_exists(tag: str) -> bool:
    """Whether podman's local storage holds an image with this tag."""
    return podman("image", "exists", tag, check=False, timeout=60).returncode == 0


def require_image(tag: str) -> str:
    """The tag, if the image is built; otherwise fail the calling test (CI builds the images first)."""
    if shutil.which("podman") is None:
        pytest.fail(f"podman is not installed, so image {tag} cannot run: run `make images`", pytrace=False)
    if not image_exists(tag):
        pytest.fail(f"image {tag} is not built: run `make images` (hack/images/build.sh)", pytrace=False)
    return tag
