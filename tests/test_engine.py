"""The functional engine: PEState is a pytree, engine.step is the run's step, and padding changes nothing."""

import dataclasses

import jax
import numpy as np
import pytest
from _reference import knn
from _toy import ToyGenerator
from _toy import flat
from _toy import private_data

import pejax
from pejax import engine
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import SpeedConfig

PE = PEConfig(
    num_classes=3,
    samples_per_iteration=27,
    iterations=3,
    k=2,
    lookahead_degree=2,
    variation_folds=2,
    final_samples_per_class=5,
    degrees=(0.8, 0.2),
)
PROPORTIONS = (
    0.3,
    0.3,
    0.4,
)  # public: the class sizes need no release, so a hand-written loop can match


def test_state_is_a_pytree_with_static_structure():
    state = engine.init(jax.random.key(0), generator=ToyGenerator(), class_sizes=(4, 5))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 2 and leaves[0].shape == (9, 6, 6, 1)  # samples, then the public key
    assert (state.iteration, state.class_sizes) == (0, (4, 5))
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.class_sizes == (4, 5) and back.iteration == 0
    # The static fields are part of the structure: another iteration is another treedef (jit retraces).
    later = dataclasses.replace(state, iteration=1)
    assert jax.tree_util.tree_structure(later) != treedef
    np.testing.assert_array_equal(engine.labels(state, PE), [0] * 4 + [1] * 5)


def test_run_is_a_driver_over_the_step():
    """A hand-written init/step loop with the run's keys releases exactly the run's synthetic set."""
    x, y = private_data()
    privacy = PrivacyConfig(epsilon=2.0, delta=1e-4, noise_seed=3, class_proportions=PROPORTIONS)
    speed = SpeedConfig(retry_backoff_s=0.0)
    result = pejax.PrivateEvolution(
        generator=ToyGenerator(), embedding=flat, pe=PE, privacy=privacy, speed=speed
    ).run(jax.random.key(7), x, y)

    gen = ToyGenerator()
    sizes = pejax.runner.allocate(PE.samples_per_iteration, PROPORTIONS, PE.min_samples_per_class)
    votes = engine.PrivateVotes.embed(x, y, None, embedding=flat, generator=gen, pe=PE, speed=speed)
    state = engine.init(jax.random.key(7), generator=gen, class_sizes=sizes)
    histograms = []
    for _ in range(PE.iterations):
        state, info = engine.step(
            state,
            votes,
            noise_key=pejax.NoiseKey.from_seed(3),
            generator=gen,
            embedding=flat,
            pe=PE,
            noise_multiplier=result.noise_multiplier,
        )
        histograms.append(info.noisy_histograms)
    assert info.final and state.iteration == PE.iterations
    np.testing.assert_array_equal(np.asarray(state.samples), np.asarray(result.samples))
    np.testing.assert_array_equal(engine.labels(state, PE), result.labels)
    assert all(h.dtype == np.float64 for hs in histograms for h in hs)
    with pytest.raises(ValueError, match=r"already pe\.iterations"):
        engine.step(
            state,
            votes,
            noise_key=pejax.NoiseKey.from_seed(3),
            generator=gen,
            embedding=flat,
            pe=PE,
            noise_multiplier=1.0,
        )


@pytest.mark.parametrize(
    ("n", "m", "n_pad", "m_pad", "k"), [(37, 13, 48, 16, 1), (50, 29, 64, 40, 3)]
)
def test_padding_changes_no_vote(n, m, n_pad, m_pad, k):
    rng = np.random.default_rng(n)
    private = rng.normal(size=(n, 5)).astype(np.float32)
    synthetic = rng.normal(size=(m, 5)).astype(np.float32)
    # Padding rows are junk on purpose (large values near the data would win if they were not masked).
    pad_p = np.concatenate([private, np.zeros((n_pad - n, 5), np.float32)])
    pad_s = np.concatenate([synthetic, np.tile(private[:1], (m_pad - m, 1))])
    votes = pejax.lattice_vote_histogram(pad_p, pad_s, k=k, num_private=n, num_synthetic=m)
    expected = np.bincount(knn(private, synthetic, k, "l2")[1].ravel(), minlength=m)
    np.testing.assert_array_equal(votes.counts, expected)
    assert votes.counts.sum() == n * k and votes.counts.shape == (m,)
    groups = np.arange(n) // 2
    user = pejax.lattice_vote_histogram(
        pad_p, pad_s, k=k, num_private=n, num_synthetic=m, group_ids=groups
    )
    plain = pejax.lattice_vote_histogram(private, synthetic, k=k, group_ids=groups)
    np.testing.assert_array_equal(user.counts, plain.counts)


def test_padding_counts_are_checked():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="num_private=5 exceeds the 4 rows"):
        pejax.lattice_vote_histogram(x, x, num_private=5)
    with pytest.raises(ValueError, match="k=3 exceeds the number of synthetic samples"):
        pejax.lattice_vote_histogram(x, x, k=3, num_synthetic=2)


def test_bucketed_selection_never_draws_padding():
    key = jax.random.key(0)
    noisy = np.array([0.0, 5.0, 0.0, 3.0])
    idx, fallback = engine.select_parents_bucketed(
        key, noisy, threshold=1.0, num_samples=50, mode="sample", rows=8
    )
    assert idx.shape == (50,) and set(idx.tolist()) <= {1, 3} and not fallback
    # Nothing survives: uniform over the 4 real bins only, never the 4 padded ones.
    idx, fallback = engine.select_parents_bucketed(
        key, noisy, threshold=100.0, num_samples=400, mode="sample", rows=8
    )
    assert fallback and set(idx.tolist()) == {0, 1, 2, 3}
    idx, _ = engine.select_parents_bucketed(
        key, np.array([1.0, 4.0, 4.0, 2.0, 0.0]), threshold=0.5, num_samples=3, mode="rank", rows=8
    )
    assert idx.tolist() == [1, 2, 3]  # the largest bins, ties to the lowest index


def test_bucket_size():
    assert [engine.bucket_size(n) for n in (1, 16, 17, 37, 41, 48, 49, 100, 1000)] == [
        1,
        16,
        20,
        40,
        48,
        48,
        56,
        112,
        1024,
    ]
    for n in range(1, 3000):
        b = engine.bucket_size(n)
        assert n <= b < 1.25 * n + 1


class BatchingToyGenerator(ToyGenerator):
    batch_buckets = True  # like the JAX simulators: the engine calls it at padded sizes


def test_classes_of_different_sizes_share_compiled_programs():
    """Counted with jax.monitoring: a second step over new class sizes in the same bucket compiles nothing."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    x, y = private_data(n_per_class=(30, 21, 26))
    speed = SpeedConfig()
    pe = dataclasses.replace(PE, lookahead_degree=0)
    votes = engine.PrivateVotes.embed(
        x, y, None, embedding=flat, generator=engine.checked(ToyGenerator()), pe=pe, speed=speed
    )

    def one_step(sizes, seed):
        gen = BatchingToyGenerator()
        state = engine.init(jax.random.key(seed), generator=gen, class_sizes=sizes)
        engine.step(
            state,
            votes,
            noise_key=pejax.NoiseKey.from_seed(0),
            generator=gen,
            embedding=flat,
            pe=pe,
            noise_multiplier=1.0,
        )

    one_step((33, 35, 37), 0)  # bucket 40 for every class
    before = len(compiles)
    one_step((34, 38, 39), 1)  # other sizes, same bucket
    assert len(compiles) == before
