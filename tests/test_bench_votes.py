"""Smoke test of benchmarks/bench_votes.py at tiny sizes: workers, interleaving, memory, machine state."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("faiss", reason="needs pejax[bench]")
pytest.importorskip("threadpoolctl", reason="needs pejax[bench]")

_SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_votes.py"


def _run(tmp_path, *extra):
    out = tmp_path / "bench.md"
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1] / "src"))
    cmd = [sys.executable, str(_SCRIPT), "--quick", "--cases", "small", "--methods"]
    cmd += [
        "pejax,pejax-blas,faiss",
        "--repeats",
        "2",
        "--max-repeats",
        "2",
        "--settle",
        "0",
        "--gap",
        "0.05",
    ]
    cmd += ["--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return proc, out


def test_quick_run_reports_everything(tmp_path):
    proc, out = _run(tmp_path, "--allow-busy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    row = next(
        line for line in text.splitlines() if line.startswith("| small") and "/ faiss" not in line
    )
    assert row.count("[") == 3  # median [min, max] for pejax, pejax-blas and faiss
    assert "load before / after" in text and "other procs (cores)" in text
    assert "pejax-blas: openblas" in text  # threadpoolctl's report, per method
    ratios = next(
        line for line in text.splitlines() if line.startswith("| small") and line.count("%") == 3
    )
    assert (
        ratios.count("100.00%") == 3
    )  # tiny, well-separated data: every method agrees with float64
    busy = "**BUSY**" in ratios
    assert busy == ("BUSY MACHINE" in text.splitlines()[0])


def test_busy_machine_refuses_to_write_unless_allowed(tmp_path):
    proc, out = _run(tmp_path)
    busy_line = next(line for line in proc.stdout.splitlines() if "load average before" in line)
    if proc.returncode == 3:
        assert "NOT writing" in proc.stdout and not out.exists()
        assert "**BUSY**" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert out.exists() and "BUSY" not in out.read_text(), busy_line


def test_burst_times_back_to_back_calls_per_call(tmp_path):
    proc, out = _run(tmp_path, "--allow-busy", "--burst", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "3 back-to-back calls per repetition, timed together and reported per call"
        in out.read_text()
    )
    bad = subprocess.run(
        [sys.executable, str(_SCRIPT), "--quick", "--burst", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--burst >= 1" in bad.stderr
