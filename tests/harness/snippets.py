"""The "load it with" lines `finetune run` prints, taken from its output and executed as printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def load_snippet(printed: str) -> str:
    """The code lines under "load it with:", as a user would copy them (comments left out)."""
    lines = printed.split("load it with:\n", 1)[1].splitlines()
    code = [ln.strip() for ln in lines if ln.startswith("    ")]
    return "\n".join(ln for ln in code if ln and not ln.startswith("#"))


def run_snippet(snippet: str, check: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Execute the snippet in a fresh interpreter, then `check` (which prints something); its stdout."""
    proc = subprocess.run([sys.executable, "-c", f"{snippet}\n{check}"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)
    assert proc.returncode == 0, f"printed snippet failed:\n{snippet}\n{proc.stderr[-3000:]}"
    return proc.stdout
