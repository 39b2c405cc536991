"""The runner with private votes sharded over 8 virtual CPU devices equals the single-device run, bit for bit."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from _toy import ToyGenerator, flat, private_data
    from pejax import PEConfig, PrivacyConfig, PrivateEvolution
    assert jax.device_count() == 8, jax.devices()
    x, y = private_data()
    pe = PEConfig(num_classes=3, samples_per_iteration=24, iterations=2, k=2, lookahead_degree=1)
    def run(mesh):
        r = PrivateEvolution(generator=ToyGenerator(), embedding=flat, pe=pe,
                             privacy=PrivacyConfig(epsilon=2.0, delta=1e-4, noise_seed=0), mesh=mesh)
        return r.run(jax.random.key(0), x, y)
    a = run(None)
    b = run(jax.make_mesh((8,), ("data",)))
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images)), "sharded run differs"
    assert a.ledger == b.ledger
    print("OK")
    """
)


@pytest.mark.slow
def test_sharded_runner_equals_single_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(pathlib.Path(__file__).parent),
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
