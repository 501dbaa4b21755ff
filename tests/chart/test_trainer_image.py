"""One default trainer image: the operator's own default (used outside the chart) is what the chart's
values give (trainer.image.repository, tag = appVersion), and one release version everywhere."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from finetune_api import constants as c

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"


def test_operator_default_trainer_image_is_the_charts() -> None:
    from finetune_operator.settings import Settings, parse_settings

    image = yaml.safe_load((CHART / "values.yaml").read_text())["trainer"]["image"]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert not image.get("digest")
    charts = f"{image['repository']}:{image.get('tag') or app_version}"
    assert c.DEFAULT_TRAINER_IMAGE == charts
    assert Settings().trainer_image == charts
    assert parse_settings([], {}).trainer_image == charts


def test_one_release_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert c.APP_VERSION == project == chart
