"""kill -9 a real `pejax run` at several points, resume, and compare with an unbroken run."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import SMALL

from pejax import checkpoint as ckpt
from pejax.accounting import PrivacyLedger

WORKER = pathlib.Path(__file__).with_name("_kill_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(WORKER.parent), "JAX_PLATFORMS": "cpu"}


def _run(config, out, kill_at=0, resume=False, timeout=600):
    args = [sys.executable, str(WORKER), str(config), str(out), str(kill_at)] + (
        ["--resume"] if resume else []
    )
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)


def _synthetic(out):
    with np.load(out / "synthetic.npz", allow_pickle=False) as data:
        return data["images"], data["labels"]


def _ledger_iterations(out):
    _, _, meta = ckpt.latest_valid_checkpoint(out / "checkpoints")
    return [r.iteration for r in PrivacyLedger.from_json(meta["ledger"]).releases]


def _resume_and_match(config, out, ref):
    """Resumes the run in ``out``; its released data must equal the unbroken run's and each iteration be spent once."""
    proc = _run(config, out, resume=True)
    assert proc.returncode == 0, proc.stderr
    for a, b in zip(_synthetic(out), _synthetic(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _ledger_iterations(out) == [0, 1, 2, 3]
    return proc


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    base = tmp_path_factory.mktemp("ft")
    config = base / "small.toml"
    # Reproducible noise (privacy.noise_seed), so that separate processes can be compared: the default secret
    # noise key is restored from the checkpoint on resume (tests/test_privacy_attacks.py checks that path).
    config.write_text(
        SMALL.replace("iterations = 2", "iterations = 3").replace(
            "max_private_samples = 1797", "max_private_samples = 1797\nnoise_seed = 1"
        )
    )
    out = base / "unbroken"
    t0 = time.monotonic()
    proc = _run(config, out)
    assert proc.returncode == 0, proc.stderr
    return config, out, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [1, 3, 4])
def test_killed_during_checkpoint_write(unbroken, tmp_path, kill_at):
    config, ref, _ = unbroken
    out = tmp_path / "run"
    proc = _run(config, out, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL
    # The final names only ever hold complete checkpoints; the half-written temporary file is ignored.
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        ckpt.load_checkpoint(path)
    _resume_and_match(config, out, ref)


@pytest.mark.slow
def test_killed_at_random_times(unbroken, tmp_path):
    config, ref, duration = unbroken
    out = tmp_path / "run"
    rng = random.Random(1234)
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(config), str(out), "0"]
            + (["--resume"] if attempt else []),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    _resume_and_match(config, out, ref)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_previous(unbroken, tmp_path):
    config, ref, _ = unbroken
    out = tmp_path / "run"
    proc = _run(config, out, kill_at=4)  # dies writing iteration 3: checkpoints 1 and 2 remain
    assert proc.returncode == -signal.SIGKILL
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # damage it
    proc = _resume_and_match(config, out, ref)
    assert "fails its SHA-256 checksum" in proc.stderr or "unreadable or truncated" in proc.stderr
