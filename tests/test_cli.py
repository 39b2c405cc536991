import json
import subprocess
import sys

import numpy as np
import pytest

from pejax.cli import main

SMALL = """
[run]
seed = 3
[data]
source = "digits"
[generator]
kind = "glyphs"
image_size = 16
[privacy]
epsilon = 2.0
max_private_samples = 1797
[pe]
num_classes = 10
samples_per_iteration = 100
iterations = 2
lookahead_degree = 1
final_samples_per_class = 8
degrees = [0.5, 0.2]
"""


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    for module in ("sklearn", "PIL", "fontTools"):  # the digits data and the glyph simulator
        pytest.importorskip(module, reason="needs pejax[demo]")
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text(SMALL)
    return path


def test_account_prints_every_accountant(capsys):
    assert (
        main(
            [
                "account",
                "--noise-multiplier",
                str(5 * 2**0.5),
                "--iterations",
                "20",
                "--delta",
                "1e-5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "epsilon (pld): 2.594" in out
        and "epsilon (rdp): 2.813" in out
        and "epsilon (gaussian): 2.594" in out
    )
    assert main(["account", "--epsilon", "1", "--iterations", "10", "--delta", "1e-6"]) == 0
    assert "noise multiplier (pld-calibrated): 13.3596" in capsys.readouterr().out


def test_account_errors(capsys):
    assert main(["account", "--epsilon", "-1", "--iterations", "10", "--delta", "1e-6"]) == 1
    assert "epsilon must be a finite number > 0" in capsys.readouterr().err
    assert main(["account", "--epsilon", "1", "--iterations", "10", "--delta", "2"]) == 1
    assert main(["account", "--iterations", "10", "--delta", "1e-5"]) == 2


@pytest.mark.slow
def test_run_writes_outputs_refuses_reuse_and_resumes(small_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(small_config), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "epsilon spent: pld 2" in printed and "final metrics: test_accuracy" in printed
    for name in ("synthetic.npz", "report.json", "samples.png", "metrics.png"):
        assert (out / name).stat().st_size > 0
    with np.load(out / "synthetic.npz", allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    assert images.dtype == np.uint8 and images.shape == (80, 16, 16)
    assert labels.tolist() == sorted(labels.tolist()) and set(labels.tolist()) == set(range(10))
    report = json.loads((out / "report.json").read_text())
    p = report["privacy"]
    assert p["epsilon_spent"]["pld"] <= 2.0 and set(p["epsilon_spent"]) == {
        "pld",
        "rdp",
        "gaussian",
    }
    assert [r["description"] for r in p["releases"]] == [
        "class counts",
        "vote histogram",
        "vote histogram",
    ]
    assert len(report["iterations"]) == 3 and "test_accuracy" in report["iterations"][-1]["metrics"]
    # The same folder again without --resume: refused, nothing touched.
    before = (out / "synthetic.npz").read_bytes()
    assert main(["run", str(small_config), "--out", str(out), "--no-progress"]) == 1
    assert "already holds another run's files" in capsys.readouterr().err
    assert (out / "synthetic.npz").read_bytes() == before
    # --resume of a finished run: the same released data, nothing spent twice.
    assert main(["run", str(small_config), "--out", str(out), "--no-progress", "--resume"]) == 0
    with np.load(out / "synthetic.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["images"], images)
    again = json.loads((out / "report.json").read_text())
    assert again["privacy"]["releases"] == p["releases"] and again["resumed_from"] == 2


def test_bad_config_key_is_reported(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(SMALL.replace("lookahead_degree", "look_ahead_degree"))
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "'look_ahead_degree' (did you mean 'lookahead_degree'?)" in err
    assert not (tmp_path / "o").exists()


def test_bad_classifier_c_is_reported_before_anything_runs(tmp_path, capsys):
    path = tmp_path / "bad_c.toml"
    path.write_text(SMALL.replace("seed = 3", "seed = 3\nclassifier_c = 0"))
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "run.classifier_c must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_console_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "pejax.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout and "account" in out.stdout and "run" in out.stdout


def test_generator_prior_from_config():
    from pejax.run_config import build_generator

    sim = build_generator({"image_size": 8, "prior": {"warp": 0.06, "ink": [0.9, 1.0]}}, 2)
    assert sim.prior.warp == 0.06 and sim.prior.ink == (0.9, 1.0)
    with pytest.raises(
        ValueError,
        match=r"unknown key\(s\) in config section \[generator.prior\]: 'wrap' \(did you mean 'warp'\?\)",
    ):
        build_generator({"prior": {"wrap": 0.06}}, 2)
