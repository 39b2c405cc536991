import pytest

from pejax import config as cfg
from pejax.config import PEConfig
from pejax.config import PrivacyConfig


def test_defaults_and_degree_schedule():
    pe = PEConfig(num_classes=10, iterations=5, degrees=(0.8, 0.05))
    assert pe.degree(1) == pytest.approx(0.8) and pe.degree(5) == pytest.approx(0.05)
    assert pe.degree(1) > pe.degree(3) > pe.degree(5)
    explicit = PEConfig(num_classes=2, iterations=3, degrees=(0.5, 0.4, 0.1))
    assert [explicit.degree(t) for t in (1, 2, 3)] == [0.5, 0.4, 0.1]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_classes=0), ValueError, "pe.num_classes must be an integer >= 1"),
        (dict(num_classes=2, k=0), ValueError, "pe.k"),
        (dict(num_classes=2, metric="manhattan"), ValueError, "pe.metric must be one of"),
        (
            dict(num_classes=2, degrees=(0.1, 0.2, 0.3)),
            ValueError,
            "pe.degrees must hold 2 numbers",
        ),
        (dict(num_classes=2, degrees=(-0.1, 0.2)), ValueError, "pe.degrees must be >= 0"),
        (
            dict(num_classes=2, threshold_sigmas=float("nan")),
            ValueError,
            "pe.threshold_sigmas must be finite",
        ),
        (dict(num_classes=50, samples_per_iteration=100), ValueError, "too small for 50 classes"),
        (dict(num_classes=2, k=8), ValueError, r"min_samples_per_class \(4\) must be >= pe.k"),
        (dict(num_classes=2, iterations=2.0), TypeError, "pe.iterations must be an integer"),
    ],
)
def test_pe_config_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0.0), "privacy.epsilon must be a finite number > 0"),
        (dict(epsilon=float("nan")), "privacy.epsilon must be a finite number > 0"),
        (dict(epsilon=1.0, delta=1.0), "privacy.delta must lie strictly between 0 and 1"),
        (dict(epsilon=1.0, delta=0.0), "privacy.delta must lie strictly between 0 and 1"),
        (dict(epsilon=None), "give privacy.epsilon"),
        (dict(epsilon=None, noise_multiplier=-1.0), "privacy.noise_multiplier must be >= 0"),
        (dict(epsilon=1.0, accountant="moments"), "privacy.accountant must be one of"),
        (dict(epsilon=1.0, class_proportions=(0.5, 0.6)), "summing to 1"),
        (dict(epsilon=1.0, class_count_budget=1.0), r"class_count_budget must lie in \(0, 1\)"),
        (dict(epsilon=1.0, neighboring="swap"), "privacy.neighboring must be one of"),
        (
            dict(epsilon=1.0, max_private_samples=1),
            "privacy.max_private_samples must be an integer >= 2",
        ),
        (dict(epsilon=1.0, accountant="gaussian"), "runs release the discrete Gaussian"),
        (dict(epsilon=1.0, user_level=True, accountant="pld"), "cannot account user-level runs"),
    ],
)
def test_privacy_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyConfig(**kwargs)


def test_privacy_config_noise_seed_and_default_accountant():
    with pytest.raises(TypeError, match=r"privacy\.noise_seed must be an integer"):
        PrivacyConfig(epsilon=1.0, noise_seed="7")
    with pytest.raises(TypeError, match=r"privacy\.max_private_samples must be an integer"):
        PrivacyConfig(epsilon=1.0, max_private_samples=1.5)
    assert PrivacyConfig(epsilon=1.0).accountant == "pld"
    assert PrivacyConfig(epsilon=1.0, user_level=True).accountant == "rdp"


def test_frozen():
    with pytest.raises(AttributeError):
        PrivacyConfig(epsilon=1.0).epsilon = 2.0


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(ValueError, match=r"'iteration' \(did you mean 'iterations'\?\)"):
        cfg.pe_from_dict({"num_classes": 2, "iteration": 3})
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) in config section \[privacy\]: 'epsilonn'"
    ):
        cfg.privacy_from_dict({"epsilonn": 1.0})


def test_load_toml_and_yaml(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text("[pe]\nnum_classes = 3\ndegrees = [0.5, 0.1]\n[privacy]\nepsilon = 2.0\n")
    data = cfg.load_config_file(toml)
    assert cfg.pe_from_dict(data["pe"]).degrees == (0.5, 0.1)
    yaml = tmp_path / "a.yaml"
    yaml.write_text("pe:\n  num_classes: 3\nprivacy:\n  epsilon: 2.0\n")
    assert cfg.load_config_file(yaml)["privacy"]["epsilon"] == 2.0


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("bad.toml", "[pe\nx=1", "not valid TOML"),
        ("bad.yaml", "pe: [1, 2", "not valid YAML"),
        ("x.json", "{}", "must end in .toml"),
        ("s.toml", "[models]\nx = 1\n", r"unknown section\(s\) \[models\] in config file"),
    ],
)
def test_bad_config_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        cfg.load_config_file(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cfg.load_config_file(tmp_path / "missing.toml")
