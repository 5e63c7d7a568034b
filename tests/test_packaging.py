"""Packaging: passes/ installs as fp8fx.passes; the demo command runs."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_passes_imports_as_fp8fx_passes():
    import fp8fx.passes

    assert Path(fp8fx.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"


@pytest.mark.slow
def test_wheel_maps_passes_into_fp8fx(tmp_path):
    # A regular (non-editable) install gets fp8fx/passes/ from the repository's passes/.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("fp8fx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fp8fx/passes/__init__.py" in names
    assert "fp8fx/kernels/__init__.py" in names
    assert not any(n.startswith("passes/") for n in names)


def test_demo_runs_and_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fp8fx", "demo", "--layers", "2", "--tokens", "32", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "converted 14 weights, skipped 1" in out.stdout
    assert "skipped lm_head.weight" in out.stdout
    assert "output error vs bf16: relative L2" in out.stdout
    assert "time per forward" in out.stdout


def test_cli_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "fp8fx", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr
