"""Tests of the empirical privacy audit (pejax.auditing and ``pejax audit``).

The audit must pass pejax's mechanism and catch each deliberately broken one. Sizes are chosen so that the
verdicts have wide margins (measured over several seeds, see experiments/results/audit_notes.md) and keys are
fixed, so the tests are deterministic:

* one release, sigma = 3 (claimed epsilon 1.271 at delta = 1e-5 under PLD), 2000 runs per side: the correct
  mechanism's bound is 0.14-0.37; noise scaled for sensitivity 1/sqrt(16) (mu = 4/3, true epsilon 6.1) gives
  1.97-2.40, a user of 4 identical samples without group normalisation (mu = 4/3) 1.96-2.36;
* a 4-iteration PE loop, sigma = 5 (claimed 1.555), 1000 runs per side: correct 0.24-0.45, noise reused across
  iterations 5.20 (the runs separate perfectly; the bound is limited only by the number of runs).
"""

import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compiles import count_compiles

pytest.importorskip("jax_privacy", reason="needs pejax[audit]")

from pejax import add_gaussian_noise
from pejax import auditing
from pejax import vote_histogram
from pejax.cli import audit as audit_cli

SIGMA_ONE = 3.0
SIGMA_LOOP = 5.0
RUNS_ONE = 2000
RUNS_LOOP = 1000


@pytest.fixture(scope="module")
def sample_setup():
    return auditing.make_audit_setup(jax.random.key(1))


@pytest.fixture(scope="module")
def user_setup():
    return auditing.make_audit_setup(jax.random.key(1), group_size=4)


@pytest.fixture(scope="module")
def loop_setup():
    return auditing.make_audit_setup(jax.random.key(1), num_synthetic=32)


def _audit_one(setup, mechanism, k):
    return auditing.audit_mechanism(
        jax.random.key(2),
        setup,
        noise_multiplier=SIGMA_ONE,
        k=k,
        runs=RUNS_ONE,
        mechanism=mechanism,
    )


def _audit_loop(setup, mechanism):
    return auditing.audit_mechanism(
        jax.random.key(2),
        setup,
        noise_multiplier=SIGMA_LOOP,
        iterations=4,
        k=4,
        runs=RUNS_LOOP,
        mechanism=mechanism,
    )


# ----------------------------------------------------------------------------------------- verdicts
def test_correct_mechanism_passes_at_sample_level(sample_setup):
    report = _audit_one(sample_setup, "correct", k=16)
    assert report.passed and report.verdict == "pass"
    assert 0.0 <= report.epsilon_lower_bound < 0.6 < report.claimed_epsilon["pld"]
    assert report.claimed_epsilon["pld"] == pytest.approx(1.271, abs=1e-3)
    assert set(report.claimed_epsilon) == {"pld", "rdp", "gaussian"}
    assert report.runs == RUNS_ONE and report.confidence == 0.95 and report.delta == 1e-5
    assert report.score_bounds.keys() == {"llr"}


def test_broken_sensitivity_is_detected(sample_setup):
    report = _audit_one(sample_setup, "sensitivity", k=16)
    assert not report.passed and report.verdict == "violation"
    assert report.epsilon_lower_bound > 1.5 > report.claimed_epsilon["pld"]


def test_correct_mechanism_passes_at_user_level(user_setup):
    report = _audit_one(user_setup, "correct", k=4)
    assert report.passed and report.user_level
    assert report.epsilon_lower_bound < 0.6


def test_broken_group_normalisation_is_detected(user_setup):
    report = _audit_one(user_setup, "no_group_norm", k=4)
    assert not report.passed
    assert report.epsilon_lower_bound > 1.5 > report.claimed_epsilon["pld"]


@pytest.mark.slow
def test_correct_pe_loop_passes(loop_setup):
    report = _audit_loop(loop_setup, "correct")
    assert report.passed
    assert report.score_bounds.keys() == {"llr", "difference"}
    assert report.epsilon_lower_bound < 0.7 < report.claimed_epsilon["pld"]
    assert report.claimed_epsilon["pld"] == pytest.approx(1.555, abs=1e-3)
    assert "4 noisy histograms" in report.audited


@pytest.mark.slow
def test_noise_reused_across_iterations_is_detected(loop_setup):
    report = _audit_loop(loop_setup, "reused_noise")
    assert not report.passed
    assert report.score_bounds["difference"] > 4.0 > report.claimed_epsilon["rdp"]
    # The single-release test statistic cannot see it: noise reuse only shows across iterations.
    assert report.score_bounds["llr"] < report.claimed_epsilon["pld"]


# ----------------------------------------------------------------------------------- the mechanisms
@pytest.fixture(scope="module")
def small():
    priv = jax.random.uniform(jax.random.key(5), (13, 3))
    syn = jax.random.uniform(jax.random.key(6), (9, 3))
    groups = np.arange(13) // 3
    return priv, syn, groups


def test_correct_mechanism_is_pejax_kernels_with_fresh_noise_per_iteration(small):
    priv, syn, groups = small
    key = jax.random.key(7)
    got = auditing.correct_mechanism(
        key, priv, syn, iteration=3, noise_multiplier=2.0, k=2, group_ids=groups
    )
    hist = vote_histogram(priv, syn, k=2, group_ids=groups)
    want = add_gaussian_noise(jax.random.fold_in(key, 3), hist, noise_multiplier=2.0)
    np.testing.assert_array_equal(got, want)


def test_broken_mechanisms_differ_from_correct_exactly_by_their_bug(small):
    priv, syn, groups = small
    key = jax.random.key(8)
    kw = {"noise_multiplier": 2.0, "k": 4}
    hist = vote_histogram(priv, syn, k=4, group_ids=groups)
    correct = auditing.correct_mechanism(key, priv, syn, iteration=1, group_ids=groups, **kw)
    broken = auditing.broken_mechanisms
    # Sensitivity: the same noise, sqrt(k) = 2 times smaller.
    sens = broken["sensitivity"](key, priv, syn, iteration=1, group_ids=groups, **kw)
    np.testing.assert_allclose(2.0 * (sens - hist), correct - hist, rtol=1e-5, atol=1e-5)
    # No group normalisation: the sample-level histogram under the same noise.
    nogn = broken["no_group_norm"](key, priv, syn, iteration=1, group_ids=groups, **kw)
    np.testing.assert_allclose(
        nogn - vote_histogram(priv, syn, k=4), correct - hist, rtol=1e-5, atol=1e-5
    )
    # Reused noise: identical in every iteration, while the correct mechanism's changes.
    r1, r2 = (
        broken["reused_noise"](key, priv, syn, iteration=t, group_ids=groups, **kw) for t in (1, 2)
    )
    np.testing.assert_array_equal(r1, r2)
    c2 = auditing.correct_mechanism(key, priv, syn, iteration=2, group_ids=groups, **kw)
    assert not np.allclose(correct, c2)


def test_broken_mechanisms_registry_is_read_only():
    assert set(auditing.broken_mechanisms) == {"sensitivity", "no_group_norm", "reused_noise"}
    assert set(auditing.MECHANISMS) == {"correct", *auditing.broken_mechanisms}
    with pytest.raises(TypeError):
        auditing.broken_mechanisms["x"] = auditing.correct_mechanism


def test_transcript_shows_reused_noise_as_equal_residuals(loop_setup):
    kw = {"noise_multiplier": SIGMA_LOOP, "iterations": 3, "k": 4, "include_canary": False}
    tr = auditing.release_transcript(jax.random.key(9), loop_setup, mechanism="reused_noise", **kw)
    assert tr.candidates.shape == (3, 32, 2) and tr.noisy.shape == (3, 32)
    np.testing.assert_array_equal(tr.candidates[0], loop_setup.synthetic)
    # The population evolves, so the canary's bins can move between iterations ...
    assert not np.allclose(tr.candidates[0], tr.candidates[2])
    # ... while the noise (noisy histogram minus the histogram of D) stays the same.
    resid = [
        np.asarray(tr.noisy[t] - vote_histogram(loop_setup.private, tr.candidates[t], k=4))
        for t in range(3)
    ]
    np.testing.assert_allclose(resid[0], resid[2], atol=1e-4)
    assert np.std(resid[0]) > 0.5 * SIGMA_LOOP
    # The loop is compiled once per (settings, shapes): another key reuses it.
    key = jax.random.key(10)
    with count_compiles() as compiles:
        tr = auditing.release_transcript(key, loop_setup, mechanism="reused_noise", **kw)
    assert compiles.count == 0, compiles.names
    assert jnp.isfinite(tr.noisy).all()


def test_setup_neighbours_differ_by_the_canary(user_setup, sample_setup):
    priv, groups = user_setup.with_canary()
    assert priv.shape == (68, 2) and groups.shape == (68,)
    assert len(np.unique(groups[-4:])) == 1 and groups[-1] not in set(groups[:-4])
    priv, groups = sample_setup.with_canary()
    assert priv.shape == (65, 2) and groups is None


# ------------------------------------------------------------------------------------------ the bound
def test_bound_is_zero_without_leakage_and_grows_with_it():
    rng = np.random.default_rng(0)
    out = rng.normal(size=3000)
    none = auditing.epsilon_lower_bound(rng.normal(size=3000), out, delta=1e-5)
    some = auditing.epsilon_lower_bound(rng.normal(size=3000) + 1.0, out, delta=1e-5)
    lots = auditing.epsilon_lower_bound(rng.normal(size=3000) + 3.0, out, delta=1e-5)
    assert none < 0.2 < some < lots
    # A valid lower bound stays below the true epsilon of the Gaussian mechanism with mu = 1 and mu = 3.
    assert some < 4.38 and lots < 16.7
    assert auditing.epsilon_lower_bound(out + 1.0, out, delta=1e-5, confidence=0.99) < some + 0.5


def test_doctests():
    result = doctest.testmod(auditing, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epsilon": 0.0}, ValueError, "epsilon must be a finite number > 0"),
        ({"epsilon": -1.0}, ValueError, "epsilon"),
        ({"epsilon": 1.0, "noise_multiplier": 2.0}, ValueError, "exactly one of epsilon"),
        ({}, ValueError, "exactly one of epsilon"),
        ({"noise_multiplier": 0.0}, ValueError, "noise_multiplier must be > 0"),
        ({"noise_multiplier": 2.0, "delta": 0.0}, ValueError, "delta must lie strictly between"),
        ({"noise_multiplier": 2.0, "delta": 1.0}, ValueError, "delta"),
        ({"noise_multiplier": 2.0, "runs": 99}, ValueError, "runs must be >= 100"),
        ({"noise_multiplier": 2.0, "runs": 1000.0}, TypeError, "runs must be an integer"),
        ({"noise_multiplier": 2.0, "confidence": 1.0}, ValueError, "confidence must lie"),
        ({"noise_multiplier": 2.0, "confidence": 0.0}, ValueError, "confidence must lie"),
        ({"noise_multiplier": 2.0, "iterations": 0}, ValueError, "iterations must be"),
        ({"noise_multiplier": 2.0, "k": 65}, ValueError, "k=65 exceeds the number of candidates"),
        ({"noise_multiplier": 2.0, "mechanism": "oops"}, ValueError, "mechanism must be one of"),
        ({"noise_multiplier": 2.0, "mechanism": 3}, TypeError, "mechanism must be a name"),
        ({"noise_multiplier": 2.0, "scores": ("llr", "x")}, ValueError, "scores must be one of"),
        ({"noise_multiplier": 2.0, "scores": "llr"}, ValueError, "non-empty sequence"),
        ({"noise_multiplier": 2.0, "accountant": "x"}, ValueError, "accountant must be one of"),
    ],
)
def test_audit_rejects_bad_arguments(sample_setup, kwargs, error, match):
    with pytest.raises(error, match=match):
        auditing.audit_mechanism(jax.random.key(0), sample_setup, **kwargs)


def test_audit_rejects_bad_key_and_setup(sample_setup):
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        auditing.audit_mechanism(0, sample_setup, noise_multiplier=2.0)
    with pytest.raises(TypeError, match=r"setup must be a pejax\.auditing\.AuditSetup"):
        auditing.audit_mechanism(jax.random.key(0), {"private": 1}, noise_multiplier=2.0)


def test_setup_validation():
    x = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match="canary is one sample"):
        auditing.AuditSetup(private=x, canary=np.ones((2, 2), np.float32), synthetic=x)
    with pytest.raises(ValueError, match="share the embedding dimension"):
        auditing.AuditSetup(private=x, canary=np.ones((1, 3), np.float32), synthetic=x)
    with pytest.raises(TypeError, match="canary must have a floating dtype"):
        auditing.AuditSetup(private=x, canary=np.ones((1, 2), np.int32), synthetic=x)
    with pytest.raises(ValueError, match="private contains NaN"):
        auditing.AuditSetup(private=x + np.nan, canary=x[:1], synthetic=x)
    with pytest.raises(ValueError, match="group_ids must be integers of shape"):
        auditing.AuditSetup(private=x, canary=x[:1], synthetic=x, group_ids=np.zeros(4, int))
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        auditing.make_audit_setup(jax.random.key(0), group_size=0)


def test_bound_validation():
    s = np.arange(10.0)
    with pytest.raises(ValueError, match="delta must lie strictly between"):
        auditing.epsilon_lower_bound(s, s, delta=0.0)
    with pytest.raises(ValueError, match="confidence must lie"):
        auditing.epsilon_lower_bound(s, s, delta=1e-5, confidence=1.5)
    with pytest.raises(ValueError, match="in_scores must be a non-empty 1-D array"):
        auditing.epsilon_lower_bound(np.zeros((2, 2)), s, delta=1e-5)
    with pytest.raises(ValueError, match="out_scores contains NaN"):
        auditing.epsilon_lower_bound(s, s + np.nan, delta=1e-5)


def test_report_is_json_serialisable_and_lists_every_accountant():
    report = auditing.AuditReport(
        epsilon_lower_bound=0.5,
        confidence=0.95,
        delta=1e-5,
        runs=100,
        claimed_epsilon={"pld": 1.0, "rdp": 1.1, "gaussian": 1.0},
        accountant="pld",
        passed=True,
        score_bounds={"llr": 0.5},
        mechanism="correct",
        noise_multiplier=3.0,
        iterations=1,
        k=1,
        user_level=False,
        audited="test",
    )
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["verdict"] == "pass" and doc["claimed_epsilon"]["rdp"] == 1.1
    text = report.summary()
    for name in ("pld", "rdp", "gaussian"):
        assert f"claimed epsilon ({name})" in text
    assert "verdict: pass" in text


# ---------------------------------------------------------------------------------------------- CLI
def _cli(argv):
    import argparse

    parser = audit_cli.add_audit_arguments(argparse.ArgumentParser())
    return audit_cli.audit_main(parser.parse_args(argv))


def test_cli_exit_codes_and_json(tmp_path, capsys):
    # Same shapes and settings as the sample-level tests above, so the compiled runs are reused.
    common = [
        "--target",
        "kernel",
        "--noise-multiplier",
        str(SIGMA_ONE),
        "--k",
        "16",
        "--runs",
        str(RUNS_ONE),
    ]
    out = tmp_path / "audit.json"
    assert _cli([*common, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "empirical epsilon lower bound" in text and "claimed epsilon (rdp)" in text
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "pass" and math.isfinite(doc["seconds"])
    assert _cli([*common, "--broken", "sensitivity"]) == 3
    assert "VIOLATION" in capsys.readouterr().out
    assert _cli(["--target", "kernel", "--runs", "200"]) == 2
    assert _cli(["--target", "kernel", "--epsilon", "1", "--noise-multiplier", "2"]) == 2
    assert _cli(["--noise-multiplier", "2"]) == 2  # the run audit calibrates to --epsilon
    assert _cli(["--target", "kernel", "--broken", "public_noise_key"]) == 2
