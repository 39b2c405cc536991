"""Runs `pejax run` in this process and SIGKILLs itself in the middle of the N-th checkpoint write.

Used by test_fault_tolerance.py: argv = config path, out folder, N (0 = never kill), mode ("write" or "none").
"""

import os
import signal
import sys

import numpy as np

from pejax import checkpoint
from pejax.cli import main


def _main():
    config, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = sys.argv[4:] == ["--resume"]
    count = {"n": 0}
    real_savez = np.savez

    def savez_then_die(f, **arrays):
        count["n"] += 1
        if count["n"] == kill_at:
            # Write part of the payload to the temporary file, then die as kill -9 would.
            real_savez(f, **arrays)
            f.flush()
            f.truncate(max(1, f.tell() // 2))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_savez(f, **arrays)

    checkpoint.np.savez = savez_then_die
    sys.exit(
        main(["run", config, "--out", out, "--no-progress"] + (["--resume"] if resume else []))
    )


if __name__ == "__main__":
    _main()
