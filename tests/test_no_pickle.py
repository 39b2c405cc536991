"""No load path of pejax may unpickle: checkpoints, configs, data and caches are read without pickle."""

import pathlib
import re

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "pejax"
FORBIDDEN = [
    r"^\s*import pickle",
    r"^\s*from pickle",
    r"import cloudpickle",
    r"allow_pickle\s*=\s*True",
    r"yaml\.load\(",  # only yaml.safe_load
    r"torch\.load\((?![^)]*weights_only\s*=\s*True)",
    r"\bjoblib\b",
]


def test_no_pickle_on_any_load_path():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in FORBIDDEN:
                if re.search(pattern, line):
                    offenders.append(f"{path.relative_to(SRC)}:{lineno}: {line.strip()}")
    assert not offenders, "pickle on a load path:\n" + "\n".join(offenders)
    # The loaders that do read files say allow_pickle=False explicitly.
    for module in ("checkpoint.py", "data.py"):
        assert "allow_pickle=False" in (SRC / module).read_text()


def test_the_scanner_can_fail(tmp_path):
    bad = "import pickle\nx = np.load(f, allow_pickle=True)\n"
    hits = [p for p in FORBIDDEN for line in bad.splitlines() if re.search(p, line)]
    assert len(hits) == 2
