"""Every example runs (on CPU here; the same scripts pick realistic dimensions on a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    args = ["--workdir", str(tmp_path)] if script.name == "convert_and_generate.py" else []
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fp8fx" in out.stdout or "generated" in out.stdout
