"""Attacks on what a run releases, each run through the public API as an adversary would.

Each test fails on the commit before the discrete Gaussian release (53f40cb): seed replay recovered the class
counts, float32 noise leaked through its floating-point support, delta revealed n, a multi-process run counted
per process, and the audit did not look at the shipped run.
"""

import functools
import json
import os
import pathlib
import socket
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _toy import ToyGenerator
from _toy import flat
from _toy import private_data
from test_cli import SMALL as CLI_SMALL

import pejax
from pejax import checkpoint as ckpt
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.runner import PrivateEvolution

PE = PEConfig(num_classes=3, samples_per_iteration=24, iterations=2, k=2)
SECRET = PrivacyConfig(epsilon=1.0, delta=1e-5)  # the default policy: a fresh secret noise key


def run(privacy=SECRET, key=0, data=None, pe=PE, **kw):
    x, y = private_data() if data is None else data
    runner = PrivateEvolution(
        generator=ToyGenerator(), embedding=flat, pe=pe, privacy=privacy, **kw
    )
    return runner.run(jax.random.key(key), x, y)


# ------------------------------------------------------------------------------------ 1. seed replay
def test_seed_replay_does_not_recover_the_class_counts():
    """The public seed (printed in every report) no longer determines the noise."""
    _, y = private_data()
    true = np.bincount(y)
    released = []
    for _ in range(3):
        r = run()
        noisy = np.asarray(r.history[0]["stats"]["noisy_class_counts"], np.float64)
        released.append(tuple(noisy))
        counts_release = r.ledger.releases[0]
        sigma = counts_release.noise_multiplier * counts_release.sensitivity
        # The attack that worked on 53f40cb: its count noise was sigma * normal(fold_in(key(seed), 1_000_003)).
        old = sigma * np.asarray(
            jax.random.normal(jax.random.fold_in(jax.random.key(0), 1_000_003), (3,))
        )
        assert not np.array_equal(np.rint(noisy - old), true)
        # Replaying pejax's own derivation from the public seed fails too.
        replay = pejax.secure_noise.discrete_gaussian_noise(
            pejax.secure_noise.NoiseKey.from_seed(0).fold_in(0, -1), sigma=sigma, size=3
        )
        assert not np.array_equal(noisy - replay, true)
    assert len(set(released)) > 1  # same public seed, fresh secret noise


def test_same_seed_differs_unless_noise_is_reproducible_and_then_says_so():
    a, b = run(), run()
    assert a.dp_release and b.dp_release
    assert not np.array_equal(np.asarray(a.images), np.asarray(b.images))
    research = PrivacyConfig(epsilon=1.0, delta=1e-5, noise_seed=11)
    c, d = run(research), run(research)
    np.testing.assert_array_equal(np.asarray(c.images), np.asarray(d.images))
    assert not c.dp_release


def test_checkpoint_fingerprint_carries_no_noise_key(tmp_path):
    """Two runs with different secret keys write the same fingerprint: nothing to brute-force."""
    run(checkpoint_dir=tmp_path / "a")
    run(checkpoint_dir=tmp_path / "b")
    metas = [ckpt.latest_valid_checkpoint(tmp_path / d)[2] for d in "ab"]
    assert metas[0]["fingerprint"] == metas[1]["fingerprint"]
    assert metas[0]["noise_key"] != metas[1]["noise_key"]
    for d in "ab":
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700
        for f in ckpt.list_checkpoints(tmp_path / d):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_resume_on_other_private_data_is_refused(tmp_path):
    """A resume on changed data would draw the same noise for different data: refused."""
    x, y = private_data()
    privacy = SECRET
    runner = PrivateEvolution(generator=ToyGenerator(), embedding=flat, pe=PE, privacy=privacy)
    runner.checkpoint_dir = tmp_path
    runner.run(jax.random.key(0), x, y, stop_after=1)
    with pytest.raises(pejax.runner.CheckpointMismatchError, match="other private data"):
        runner.run(jax.random.key(0), x[::-1].copy(), y[::-1].copy(), resume=True)
    resumed = runner.run(jax.random.key(0), x, y, resume=True)
    assert resumed.resumed_from == 1


# ----------------------------------------------------------------------- 2. floating-point support
@functools.lru_cache(maxsize=1)
def _float32_uniforms() -> np.ndarray:
    """Every float32 uniform that jax.random.normal can feed to erfinv (its 2^23 mantissas, mapped to (-1, 1))."""
    mant = np.arange(1 << 23, dtype=np.uint32)
    f = (mant | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.maximum(lo, f * (np.float32(1.0) - lo) + lo).astype(np.float32)


@jax.jit
def _noisy_from_uniform(u, h, std):
    """The float32 noisy value h + std * sqrt(2) erfinv(u), compiled as pejax.add_gaussian_noise computes it."""
    z = jax.lax.mul(np.array(np.sqrt(2), np.float32), jax.lax.erf_inv(u))
    return h.astype(jnp.float32) + std * z


def _reachable(values, h, std, support=None):
    """Whether each value can be the float32 output of the Gaussian kernel for true value h (all 2^23 cases).

    Validated in the test against real outputs (if JAX changes its sampler, the attack model must change too).
    """
    del support
    reachable = np.asarray(
        _noisy_from_uniform(_float32_uniforms(), jnp.float32(h), jnp.float32(std))
    )
    return np.isin(np.asarray(values, np.float32), reachable)


def _membership_attack(out_d, out_d1, h, std, support):
    """Certain decisions: a value reachable from h but not h + 1 says D; the reverse says D + 1.

    Returns (certain and correct, certain and wrong) over all outputs of both sides.
    """
    right = wrong = 0
    for outs, truth in ((out_d, 0), (out_d1, 1)):
        r0, r1 = _reachable(outs, h, std, support), _reachable(outs, h + 1, std, support)
        says_d, says_d1 = r0 & ~r1, r1 & ~r0
        right += int((says_d if truth == 0 else says_d1).sum())
        wrong += int((says_d1 if truth == 0 else says_d).sum())
    return right, wrong


@pytest.mark.slow
def test_float_support_attack_wins_on_float32_noise_and_loses_on_the_release():
    support = None
    key = jax.random.key(123)
    std, h, n = 9.7, 30.0, 3000
    float32_d = np.asarray(pejax.add_gaussian_noise(key, jnp.full(n, h), noise_multiplier=std))
    # The attack's model of the kernel is exact: every real output is reachable from the true value.
    assert _reachable(float32_d, h, std, support).all()
    float32_d1 = np.asarray(
        pejax.add_gaussian_noise(jax.random.key(7), jnp.full(n, h + 1), noise_multiplier=std)
    )
    right, wrong = _membership_attack(float32_d, float32_d1, h, std, support)
    assert wrong == 0 and right > 0.2 * 2 * n  # certain, never wrong, often: the leak
    # What pejax releases: integer counts plus discrete Gaussian noise, through its public mechanism.
    key_d, key_d1 = pejax.secure_noise.NoiseKey.generate(), pejax.secure_noise.NoiseKey.generate()
    counts = np.full(n, int(h))
    dg_d = pejax.mechanism.add_discrete_gaussian_noise(key_d, counts, sigma=std)
    dg_d1 = pejax.mechanism.add_discrete_gaussian_noise(key_d1, counts + 1, sigma=std)
    right, wrong = _membership_attack(dg_d, dg_d1, h, std, support)
    # Its "certain" decisions are coin flips: as many wrong as right (within sampling error).
    assert right + wrong > 100
    assert abs(right - wrong) < 4 * np.sqrt(right + wrong)
    # And the shipped run releases integers only (the class counts of a 2-class run, as in the finding).
    r = run(pe=PEConfig(num_classes=3, samples_per_iteration=24, iterations=2))
    released = r.history[0]["stats"]["noisy_class_counts"]
    assert all(isinstance(c, int) for c in released)


# ------------------------------------------------------------------------------------- 3. n from delta
def test_delta_and_sigma_do_not_reveal_n():
    """Under add/remove adjacency, D and D + one sample publish the same delta, sigma and schedule."""
    x, y = private_data()
    privacy = PrivacyConfig(epsilon=1.0, max_private_samples=1000)
    a = run(privacy, data=(x, y))
    b = run(privacy, data=(np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])))
    assert a.ledger.delta == b.ledger.delta == pytest.approx(1 / (1000 * np.log(1000)))
    assert a.noise_multiplier == b.noise_multiplier and a.delta_rule == b.delta_rule
    assert a.ledger.releases == b.ledger.releases
    with pytest.raises(ValueError, match="n is private, so delta cannot be derived from it"):
        run(PrivacyConfig(epsilon=1.0))
    with pytest.raises(ValueError, match="public upper bound"):
        run(PrivacyConfig(epsilon=1.0, max_private_samples=50))


def test_replace_one_accounts_a_class_change_as_two_histograms():
    """n public: delta may come from n, and a swap that changes class moves two histograms (sqrt 2)."""
    r = run(PrivacyConfig(epsilon=1.0, neighboring="replace_one"))
    assert r.neighboring_relation == "replace_one_sample" and "n public" in r.delta_rule
    votes = r.ledger.releases[1]
    assert votes.unit_changes == 2 * PE.k and votes.sensitivity == pytest.approx(np.sqrt(2 * PE.k))
    add_remove = run(PrivacyConfig(epsilon=1.0, delta=r.ledger.delta))
    assert r.noise_multiplier == pytest.approx(np.sqrt(2) * add_remove.noise_multiplier, rel=0.02)
    assert r.ledger.epsilon("pld") <= 1.0


# --------------------------------------------------------------------------------- 4. multi-process
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, mode):
    here = pathlib.Path(__file__).parent
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(here),
    }
    port = _free_port()
    outs = [tmp_path / f"{mode}{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(here / "_runner_multihost_worker.py"),
                str(outs[i]),
                str(port),
                str(i),
                mode,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [dict(np.load(o)) for o in outs]


@pytest.mark.slow
def test_two_process_run_counts_and_checks_over_all_processes(tmp_path):
    results = _two_processes(tmp_path, "sample")
    privacy = PrivacyConfig(epsilon=2.0, neighboring="replace_one", noise_seed=0)
    ref = run(privacy, pe=PEConfig(num_classes=3, samples_per_iteration=24, iterations=2, k=2))
    for r in results:
        assert "error" not in r, r.get("error")
        np.testing.assert_array_equal(r["counts"], ref.history[0]["stats"]["noisy_class_counts"])
        assert float(r["delta"]) == ref.ledger.delta  # n = 75 over both processes, not 40 or 35
        np.testing.assert_array_equal(r["images"], np.asarray(ref.images))
    # A user whose samples lie in class 0 on process 0 and class 2 on process 1 is refused on both.
    for r in _two_processes(tmp_path, "user"):
        assert "single class" in str(r["error"])


# ---------------------------------------------------------------------- 5. what outputs reveal (CLI)
SMALL = CLI_SMALL.replace("seed = 3", "seed = 3\nevaluate = false").replace(
    "lookahead_degree = 1\n", ""
)


@pytest.mark.slow
def test_cli_outputs_keep_the_key_secret_and_same_seed_runs_differ(tmp_path, capsys):
    from pejax.cli import main

    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    images = [np.load(o / "synthetic.npz")["images"] for o in outs]
    assert not np.array_equal(images[0], images[1])  # same public seed, fresh secret noise
    for out in outs:
        secret = ckpt.latest_valid_checkpoint(out / "checkpoints")[2]["noise_key"]
        public = [p for p in out.iterdir() if p.is_file()]
        assert {p.name for p in public} >= {"synthetic.npz", "report.json", "samples.png"}
        for p in public:
            assert secret.encode() not in p.read_bytes() and secret not in p.read_text(
                errors="ignore"
            )
            assert not p.stat().st_mode & 0o111, f"{p.name} is executable"
        assert secret not in printed.out + printed.err
        report = json.loads((out / "report.json").read_text())
        assert report["privacy"]["differentially_private"] is True and "WARNING" not in report
        assert report["privacy"]["neighboring_relation"] == "add_or_remove_one_sample"
    # Reproducible noise: equal outputs, and every output says it is not a DP release.
    cfg.write_text(
        SMALL.replace("max_private_samples = 1797", "max_private_samples = 1797\nnoise_seed = 5")
    )
    for name in ("c", "d"):
        assert main(["run", str(cfg), "--out", str(tmp_path / name), "--no-progress"]) == 0
    assert "NOT a differentially private release" in capsys.readouterr().out
    c, d = (np.load(tmp_path / n / "synthetic.npz") for n in "cd")
    np.testing.assert_array_equal(c["images"], d["images"])
    assert "NOT a differentially private release" in str(c["notice"])
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert "NOT a differentially private release" in report["WARNING"]
    assert report["privacy"]["differentially_private"] is False
    from PIL import Image

    assert (
        "NOT a differentially private" in Image.open(tmp_path / "c" / "samples.png").text["Comment"]
    )


def test_killed_and_resumed_secret_key_run_equals_its_unbroken_run(tmp_path):
    """With the default secret key: the key is restored from the private checkpoint, so the resumed run releases
    exactly what the unbroken run with that key releases."""
    x, y = private_data()
    runner = PrivateEvolution(
        generator=ToyGenerator(), embedding=flat, pe=PE, privacy=SECRET, checkpoint_dir=tmp_path
    )
    runner.run(jax.random.key(4), x, y, stop_after=1)
    secret = ckpt.latest_valid_checkpoint(tmp_path)[2]["noise_key"]
    resumed = runner.run(jax.random.key(4), x, y, resume=True)
    unbroken = PrivateEvolution(
        generator=ToyGenerator(), embedding=flat, pe=PE, privacy=SECRET
    ).run(jax.random.key(4), x, y, noise_key=pejax.NoiseKey.import_secret(secret))
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(unbroken.images))
    assert resumed.ledger == unbroken.ledger and resumed.dp_release
    with pytest.raises(pejax.runner.CheckpointMismatchError, match="another noise key"):
        runner.run(jax.random.key(4), x, y, resume=True, noise_key=pejax.NoiseKey.generate())
