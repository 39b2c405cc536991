"""benchmarks/bench_gpu_votes.py at tiny sizes on the CPU: every method runs and reports what the GPU run needs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).parents[1]
_SCRIPT = _ROOT / "benchmarks" / "bench_gpu_votes.py"
_TINY_PE = [
    "--pe-image-size", "8", "--pe-classes", "2", "--pe-candidates", "8", "--pe-private", "40",
    "--pe-steps", "2", "--pe-base-channels", "8", "--pe-channel-mults", "1", "--pe-batch-size", "64",
    "--pe-embed-dim", "16",
]  # fmt: skip


def _run(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(_ROOT / "src"), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(_SCRIPT), "--workdir", str(tmp_path / "work")]
    cmd += ["--out", str(tmp_path / "out"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out" / "results.json").read_text())["rows"], proc.stdout


def test_vote_methods_at_tiny_sizes(tmp_path):
    pytest.importorskip("torch", reason="needs pejax[bench]")
    rows, stdout = _run(
        tmp_path,
        *("--cases", "300x200x16", "--methods", "jax", "torch", "faiss", "--block-sizes", "64"),
        *("--repeats", "1", "--check-rows", "50", "--torch-block", "128"),
    )
    assert not [r for r in rows if "error" in r], rows
    by = {r["method"]: r for r in rows}
    floors = [name for name in by if "floor" in name]
    assert len(floors) == 4  # float32 and bfloat16, in JAX and in torch
    pejax = [r for name, r in by.items() if name.startswith("pejax")]
    assert {r["precision"] for r in pejax} == {"highest", "bfloat16"}
    torch_rows = [r for name, r in by.items() if name.startswith("torch") and "floor" not in name]
    assert len(torch_rows) == 3 and any("cdist + topk" in r["method"] for r in torch_rows)
    for r in pejax + torch_rows:
        assert r["share_of_matmul"] > 0 and r["time_s"] > 0
        if "no re-check" not in r["method"]:
            assert r["agree_float64"] >= 0.98, (
                r
            )  # exact methods agree with float64 (near-ties aside)
    faiss_rows = [r for name, r in by.items() if name.startswith("faiss")]
    assert len(faiss_rows) == 1
    if "skipped" not in faiss_rows[0]:
        assert faiss_rows[0]["agree_float64"] >= 0.98 and faiss_rows[0]["share_of_matmul"] > 0
    assert "| 300x200x16 | pejax vote_histogram precision=bfloat16" in stdout


@pytest.mark.slow
def test_pe_iteration_at_tiny_sizes(tmp_path):
    rows, stdout = _run(tmp_path, "--methods", "pe", "--cases", "300x200x16", *_TINY_PE)
    (row,) = rows
    assert "error" not in row, row
    assert row["images_generated_per_iteration"] == 2 * 8 * (1 + 4)
    assert set(row["phases_s"]) >= {"generation", "embedding", "votes", "selection", "total"}
    assert len(row["iterations_s"]) == 2 and row["time_s"] == row["iterations_s"][-1]
    assert "| pe | PE iteration, flax-ddpm 8x8x3" in stdout
