"""The rank side of a torchrun launch: what each process torchrun starts runs and records (fast)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from finetune_api.constants import Env, ExitCode
from finetune_trainer import launcher


def test_each_rank_runs_the_entry_point_and_records_its_exit_code(tmp_path: Path) -> None:
    """torchrun runs RANK_MODULE in each rank; it trains (here: fails on a missing spec, a permanent
    error) and records its exit code where the launching process reads it."""
    results = tmp_path / "ranks"
    results.mkdir()
    env = {**os.environ, launcher.LAUNCHED_ENV: "1", launcher.RESULTS_ENV: str(results), "RANK": "3",
           Env.SPEC_PATH: str(tmp_path / "missing.json"), Env.TERMINATION_LOG: str(tmp_path / "termination")}
    cmd = launcher.torchrun_command(launcher.Rendezvous.from_env({}), [])
    module_at = cmd.index("-m", 2)  # torchrun's own "-m torch.distributed.run" comes first
    proc = subprocess.run([sys.executable, "-m", cmd[module_at + 1]], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == ExitCode.PERMANENT, proc.stderr
    assert launcher.read_results(results) == {3: ExitCode.PERMANENT}
    assert "missing.json: no such spec file" in json.loads((tmp_path / "termination").read_text())["message"]


def test_launcher_does_not_import_the_entry_point() -> None:
    """No import circle: the entry point imports the launcher, never the other way round (also not
    inside a function)."""
    tree = ast.parse(Path(launcher.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not {name for name in imported if name.endswith("entrypoint")}
