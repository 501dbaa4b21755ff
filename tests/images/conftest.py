"""Fixtures of the image tests: each image's root filesystem, mounted read-only out of podman's storage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.images import OPERATOR_IMAGE, TRAINER_IMAGE, podman, require_image


def _mounted(tag: str) -> Iterator[Path]:
    require_image(tag)
    path = Path(podman("image", "mount", tag, timeout=120).stdout.strip())
    try:
        yield path
    finally:
        podman("image", "unmount", tag, check=False, timeout=120)


@pytest.fixture(scope="session")
def operator_rootfs() -> Iterator[Path]:
    yield from _mounted(OPERATOR_IMAGE)


@pytest.fixture(scope="session")
def trainer_rootfs() -> Iterator[Path]:
    yield from _mounted(TRAINER_IMAGE)


@pytest.fixture(params=[OPERATOR_IMAGE, TRAINER_IMAGE], ids=["operator", "trainer"])
def image_rootfs(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(tag, its root filesystem) for each of the two images."""
    fixture = "operator_rootfs" if request.param == OPERATOR_IMAGE else "trainer_rootfs"
    return request.param, request.getfixturevalue(fixture)
