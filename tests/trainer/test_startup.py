"""startup.begin: optional libraries a spec does not use stay out of a fresh trainer process, the
garbage collector waits until a trainer exists, and a run started that way trains exactly as a
run without it."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_api.resource import parse_spec
from finetune_trainer import startup

# A fresh process that trains `spec` with run_job, as `finetune train` does, and reports what it loaded.
RUN = """
    import gc, json, sys
    from pathlib import Path
    from finetune_api.resource import parse_spec
    spec = parse_spec(json.loads(Path(sys.argv[1]).read_text()))
    if sys.argv[2] == "begin":
        from finetune_trainer import startup
        startup.begin(spec)
        assert not gc.isenabled(), "begin pauses the collector"
    from finetune_trainer.runner import Overrides, run_job
    result = run_job(spec, None, Overrides(progress=False, serve_metrics=False))
    from peft.import_utils import is_bnb_available
    from accelerate.utils import is_deepspeed_available
    from transformers.utils import is_triton_available
    loaded = sorted(n for n in ("bitsandbytes", "deepspeed", "triton") if sys.modules.get(n) is not None)
    print("RESULT " + json.dumps({"loaded": loaded, "peft_sees_bnb": is_bnb_available(),
                                  "collector_on": gc.isenabled(), "frozen": gc.get_freeze_count(),
                                  "accelerate_sees_deepspeed": is_deepspeed_available(),
                                  "transformers_sees_triton": is_triton_available(),
                                  "train": result.metrics["train"],
                                  "weights": {f.path: f.sha256 for f in result.manifest.files
                                              if f.path.endswith(".safetensors")}}))
"""


def _spec(make_spec: Callable[..., dict[str, Any]], output: Path, **sections: Any) -> Any:
    return parse_spec(make_spec(output, **sections))


def _run(spec: dict[str, Any], tmp: Path, mode: str) -> dict[str, Any]:
    spec_file = tmp / f"{mode}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RUN), str(spec_file), mode],
                          capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin", "HOME": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return dict(json.loads(line.removeprefix("RESULT ")))


def test_unused_libraries_follow_the_spec(make_spec: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    # The tests' specs run on the CPU (gpusPerNode 0): no triton kernel either.
    assert startup.unused_libraries(_spec(make_spec, tmp_path)) == ("bitsandbytes", "deepspeed", "triton")
    qlora = _spec(make_spec, tmp_path, method={"type": "qlora", "lora": {"r": 8, "alpha": 16}},
                  model={"quantization": {"bits": 4}})
    assert "bitsandbytes" not in startup.unused_libraries(qlora)
    adam8 = _spec(make_spec, tmp_path, hyperparameters={"optimizer": "paged_adamw_8bit"})
    assert startup.unused_libraries(adam8) == ("deepspeed", "triton")
    gpu = _spec(make_spec, tmp_path, resources={"gpusPerNode": 1})
    assert startup.unused_libraries(gpu) == ("bitsandbytes", "deepspeed")
    ds = _spec(make_spec, tmp_path, resources={"gpusPerNode": 2},
               distributed={"strategy": "deepspeed", "deepspeed": {"zeroStage": 2}})
    assert startup.unused_libraries(ds) == ("bitsandbytes",)


def test_begin_keeps_nothing_out_once_torch_is_loaded(make_spec: Callable[..., dict[str, Any]],
                                                     tmp_path: Path) -> None:
    import torch  # noqa: F401  (as in this test process: libraries loaded before the call)

    before = {n: sys.modules.get(n, "absent") for n in ("bitsandbytes", "deepspeed")}
    frozen = gc.get_freeze_count()
    assert startup.begin(_spec(make_spec, tmp_path)) is None  # cache off: no read-ahead either
    assert {n: sys.modules.get(n, "absent") for n in ("bitsandbytes", "deepspeed")} == before
    # The caller's heap is not ours to freeze: the collector stays on, and settle does nothing.
    assert gc.isenabled()
    startup.settle()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    with pytest.raises(RuntimeError, match="torch already imported"):
        startup.keep_out(("torch",))


def test_a_kept_out_library_fails_loudly_when_imported() -> None:
    code = ("from finetune_trainer import startup; startup.keep_out(('bitsandbytes',))\n"
            "import bitsandbytes")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr and "bitsandbytes" in proc.stderr


def test_the_collector_waits_for_the_first_trainer_then_skips_start_up_objects(
    make_spec: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """In a fresh process: begin pauses the collector, and the first trainer built (the recipes'
    StartupOver callback) freezes what start-up left alive and switches it back on, once."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(make_spec(tmp_path / "out")))
    code = textwrap.dedent("""
        import gc, json, sys
        from pathlib import Path
        from finetune_api.resource import parse_spec
        from finetune_trainer import startup
        startup.settle()  # before begin: nothing paused, nothing frozen
        seen = [gc.isenabled(), gc.get_freeze_count()]
        startup.begin(parse_spec(json.loads(Path(sys.argv[1]).read_text())))
        seen += [gc.isenabled()]
        from finetune_trainer.recipes.base import StartupOver
        StartupOver().on_init_end(None, None, None)
        seen += [gc.isenabled(), gc.get_freeze_count() > 100_000]
        frozen = gc.get_freeze_count()
        StartupOver().on_init_end(None, None, None)  # a second trainer (the RLHF pipeline): no-op
        print(json.dumps(seen + [gc.get_freeze_count() == frozen]))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(spec_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, 0, False, True, True, True]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lora_run_without_the_unused_libraries_trains_the_same(
    make_spec: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """Two fresh processes train the same LoRA spec, one after startup.begin: that one never loads
    bitsandbytes, deepspeed or triton (peft, accelerate and transformers see them as not
    installed) and ran with the collector paused until its trainer existed, and both end with the
    same losses and the same adapter bytes."""
    spec = make_spec(tmp_path / "plain", hyperparameters={"maxSteps": 4})
    plain = _run(spec, tmp_path, "plain")
    lean = _run({**spec, "output": {"uri": str(tmp_path / "lean")}}, tmp_path, "begin")
    assert plain["loaded"] == ["bitsandbytes", "deepspeed", "triton"] and plain["peft_sees_bnb"]
    assert plain["transformers_sees_triton"]
    assert lean["loaded"] == [] and not lean["peft_sees_bnb"] and not lean["accelerate_sees_deepspeed"]
    assert not lean["transformers_sees_triton"]
    assert lean["collector_on"] and lean["frozen"] > 100_000  # start-up frozen, collector back on
    assert plain["collector_on"] and plain["frozen"] == 0
    assert lean["train"]["steps"] == plain["train"]["steps"] == 4
    assert lean["train"]["finalLoss"] == plain["train"]["finalLoss"]
    assert plain["weights"] and lean["weights"] == plain["weights"]
