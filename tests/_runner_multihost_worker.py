"""Subprocess helper for tests/test_privacy_attacks.py: one process of a two-process PE run (jax.distributed).

Each process holds only some of the private rows (process 0: rows [0, 40), process 1: rows [40, 75) of
``_toy.private_data()``, so process 1 has no sample of class 0). The run's n, class counts, user checks and votes
must be aggregated over both processes: the released data must equal the single-process run on all rows.
"""

import sys

import jax
import numpy as np

SPLIT = 40


def main(out_path, port, process_id, mode):
    from _toy import ToyGenerator
    from _toy import flat
    from _toy import private_data

    import pejax.sharding as sh
    from pejax import PEConfig
    from pejax import PrivacyConfig
    from pejax import PrivateEvolution

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sh.initialize_distributed(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    x, y = private_data()
    rows = slice(0, SPLIT) if process_id == 0 else slice(SPLIT, None)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    user = mode == "user"
    privacy = PrivacyConfig(epsilon=2.0, neighboring="replace_one", noise_seed=0, user_level=user)
    pe = PEConfig(num_classes=3, samples_per_iteration=24, iterations=2, k=2)
    runner = PrivateEvolution(
        generator=ToyGenerator(), embedding=flat, pe=pe, privacy=privacy, mesh=mesh
    )
    kw = {}
    if user:
        groups = np.arange(len(y)) // 3 + 1000 * y
        groups[-1] = groups[
            0
        ]  # one user with samples in class 0 (process 0) and class 2 (process 1)
        kw["group_ids"] = groups[rows]
    try:
        r = runner.run(jax.random.key(0), x[rows], y[rows], **kw)
    except ValueError as err:
        np.savez(out_path, error=np.asarray(str(err)))
        return
    np.savez(
        out_path,
        images=np.asarray(r.images),
        counts=np.asarray(r.history[0]["stats"]["noisy_class_counts"]),
        delta=np.asarray(r.ledger.delta),
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
