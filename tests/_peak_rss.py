"""Arrays at a chosen alignment, and the extra resident memory of one vote measured in a fresh process."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

needs_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS"
)


def offset_array(rows, d, offset, dtype=np.float32, seed=0):
    """A C-contiguous (rows, d) array of normal values whose data start exactly ``offset`` bytes past a 128-byte
    boundary (0: used in place by the CPU device; 16: copied, like NumPy's own large arrays)."""
    item = np.dtype(dtype).itemsize
    buf = np.empty(rows * d * item + 256, np.uint8)
    off = (-buf.ctypes.data) % 128 + offset
    x = buf[off : off + rows * d * item].view(dtype).reshape(rows, d)
    x[:] = np.random.default_rng(seed).normal(size=(rows, d))
    return x


_MEASURE = r"""
import gc
import numpy as np
import pejax

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

pejax.vote_histogram(private, synthetic).block_until_ready()  # compile
gc.collect()
before = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
h = np.asarray(pejax.vote_histogram(private, synthetic))
assert h.sum() == private.shape[0]
print((kib("VmHWM") - before) / 1024)
"""


def vote_extra_mib(setup: str) -> float:
    """Runs ``setup`` (Python that defines ``private`` and ``synthetic``; ``offset_array`` is importable from
    ``_peak_rss``) in a fresh process, then one vote to compile and a second, measured one. Returns the second
    vote's extra memory in MiB: its peak RSS (reset just before the call) minus the RSS before it."""
    script = (
        f"import sys\nsys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        + setup
        + _MEASURE
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        # A fixed mmap threshold: glibc otherwise keeps large freed blocks of the previous call resident and
        # reuses them, which can hide a copy from the RSS peak.
        env={**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return float(out.stdout.split()[-1])
