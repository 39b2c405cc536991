"""The black-box audit of the shipped run passes pejax's runner and catches every planted bug."""

import json

import pytest

pytest.importorskip("jax_privacy", reason="needs pejax[audit]")

from pejax import run_audit

RUNS = 100  # per side: perfect separation then bounds epsilon at about 2.5 > the claimed 1


@pytest.mark.slow
def test_the_shipped_run_passes():
    report = run_audit.audit_run(runs=RUNS, pairs=3, seed=0)
    assert report.passed and report.runner == "PrivateEvolution", report.summary()
    assert report.claimed_epsilon == pytest.approx(1.0, rel=1e-3)
    assert report.off_lattice_values == 0
    assert report.max_sensitivity == pytest.approx(1.0)  # the canary's one vote, exactly
    assert set(report.score_bounds) == set(run_audit.SCORES)


@pytest.mark.slow
@pytest.mark.parametrize(
    "bug,caught_by",
    [
        ("shared_noise_across_classes", "difference_classes"),
        ("shared_noise_across_iterations", "difference_iterations"),
        ("public_noise_key", "seed_replay"),
        ("noise_before_class_mask", "sensitivity"),
        ("continuous_noise", "lattice"),
    ],
)
def test_planted_bugs_in_the_shipped_path_are_caught(bug, caught_by):
    report = run_audit.audit_run(runner=bug, runs=RUNS, pairs=3, seed=0)
    assert not report.passed, report.summary()
    if caught_by == "sensitivity":
        assert report.max_sensitivity > 1.3
    elif caught_by == "lattice":
        assert report.off_lattice_values > 0
    else:
        assert report.score_bounds[caught_by] > report.claimed_epsilon


def test_bad_arguments():
    with pytest.raises(ValueError, match="runner must be 'correct'"):
        run_audit.audit_run(runner="nope")
    with pytest.raises(ValueError, match="runs must be an integer >= 50"):
        run_audit.audit_run(runs=10)


@pytest.mark.slow
def test_cli_audits_the_run_by_default(tmp_path, capsys):
    from pejax.cli import main

    out = tmp_path / "audit.json"
    assert main(["audit", "--runs", "50", "--seed", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PrivateEvolution.run (the shipped run)" in text and "verdict: pass" in text
    assert json.loads(out.read_text())["verdict"] == "pass"
    assert main(["audit", "--runs", "60", "--broken", "public_noise_key"]) == 3
    assert "VIOLATION" in capsys.readouterr().out
