import subprocess
import sys

import pejax

CORE = {
    "HISTOGRAM_SENSITIVITY",
    "AllZeroHistogramWarning",
    "BudgetExceededError",
    "Neighbors",
    "PejaxWarning",
    "PrivacyLedger",
    "Release",
    "Selection",
    "accounting",
    "add_gaussian_noise",
    "add_discrete_gaussian_noise",
    "release_lattice_votes",
    "lattice_vote_histogram",
    "LatticeVotes",
    "NoiseKey",
    "histogram_sensitivity",
    "nearest_neighbors",
    "select",
    "select_parents",
    "threshold",
    "vote_histogram",
}


def test_core_names_are_exported():
    assert CORE <= set(pejax.__all__)
    for name in pejax.__all__:
        assert hasattr(pejax, name), name


def test_import_is_light():
    code = (
        "import sys, pejax; heavy = [m for m in ('torch', 'sklearn', 'matplotlib', 'PIL', 'diffusers', "
        "'transformers', 'faiss') if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
