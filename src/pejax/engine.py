"""The PE engine: one Private Evolution iteration as a function of a state pytree.

In the spirit of optax's ``init``/``update``::

    state = engine.init(key, generator=g, class_sizes=sizes)            # the RANDOM population (iteration 0)
    for t in range(1, pe.iterations + 1):
        state, info = engine.step(state, votes, noise_key=nk, generator=g, embedding=e, pe=pe,
                                  noise_multiplier=sigma)
    synthetic = state.samples                                             # after iteration T: the released set

:class:`PEState` is a pytree (``samples`` and the public ``key`` are its leaves; ``iteration`` and
``class_sizes`` its static structure) and :func:`step` has no I/O, no hidden attributes and no Python-side state:
what it reads is in its arguments, what it makes is in its result. :class:`pejax.PrivateEvolution` is a driver
around it (resume, checkpoints, the privacy ledger, callbacks, progress, reports), and ``pejax audit`` audits that
driver, hence this step.

Per class y at iteration t (classes partition the private data)::

    e   = embed(S_{t-1, y})  (or the mean embedding of L lookahead variations)
    h   = votes(y, e)                       # the only access to private data: integer lattice votes
    h~  = h + N_Z(0, (sigma * Delta)^2)     # exact discrete Gaussian noise, keyed by noise_key.fold_in(t, y)
    p   = select(max(h~ - threshold, 0))    # post-processing
    S_t = VARIATION(p, degree_t)            # at t = T: the released samples

The secret :class:`pejax.secure_noise.NoiseKey` is an argument of :func:`step`, never part of the state: a state
may be logged, returned or shown; the noise key must stay secret.

Compile once. The JAX kernels see every class padded to a shared size, :func:`bucket_size` (4 sizes per octave):
embeddings of candidate images, private rows and vote kernels run at bucketed sizes with the padding masked (see
``num_private``/``num_synthetic`` of :func:`pejax.votes.lattice_vote_histogram`), and selection draws a bucketed
number of parents, of which the first are used. Generators are always called with exact sizes (a remote
generator must not be billed for padding; a JAX simulator buckets on its own).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _validate
from pejax import buckets
from pejax._compile import quick_jit
from pejax.config import PEConfig
from pejax.config import SpeedConfig
from pejax.generators._checked import CheckedGenerator
from pejax.mechanism import release_lattice_votes
from pejax.secure_noise import NoiseKey
from pejax.votes import LatticeVotes
from pejax.votes import lattice_vote_histogram


def bucket_size(n: int) -> int:
    """The engine's padded size for n rows: :func:`pejax.buckets.bucket_size` with 4 sizes per octave (at most
    25% more rows; sizes up to 16 are kept).

    Arrays whose leading size is bucketed share compiled XLA programs: PE's classes and lookahead copies come in
    many sizes, and without buckets every one of them would compile its own kernels.
    """
    n = _validate.positive_int("n", n, minimum=0)
    return n if n == 0 else buckets.bucket_size(n, per_octave=4, exact_up_to=16)


# ----------------------------------------------------------------------------------------------- state
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["samples", "key"],
    meta_fields=["iteration", "class_sizes"],
)
@dataclasses.dataclass(frozen=True)
class PEState:
    """The state of a PE run between iterations (a pytree).

    Attributes:
      samples: generator samples (a pytree whose leaves have a leading axis), classes concatenated in label
        order: the candidates of iteration ``iteration + 1``, or after iteration T the released set.
      key: the run's public ``jax.random`` key (generator, lookahead and selection derive from it; never noise).
      iteration: t of the last completed iteration (0: the RANDOM population).
      class_sizes: candidates per class (the released set has ``pe.final_samples_per_class`` each when set).
    """

    samples: Any
    key: jax.Array
    iteration: int
    class_sizes: tuple[int, ...]


class StepInfo(NamedTuple):
    """What one :func:`step` released and measured.

    Attributes:
      noisy_histograms: per class, the (m_y,) float64 noisy vote histogram (exact lattice values): the outputs of
        the discrete Gaussian mechanism, one release per class.
      candidates: per class, the samples those histograms voted over.
      stats: noise multiplier, degree, surviving bins, uniform fallbacks and noisy maxima per class.
      timings: seconds per phase (embedding, votes, selection, generation, total); they depend on n.
      final: True when this was iteration T (``state.samples`` is then the released set).
    """

    noisy_histograms: tuple[np.ndarray, ...]
    candidates: tuple[Any, ...]
    stats: dict[str, Any]
    timings: dict[str, float]
    final: bool


ClassVotes = Callable[[int, jax.Array, int], LatticeVotes]
"""The private side of a step: ``votes(label, candidates (m_pad, D) float32, m) -> LatticeVotes`` over the first
``m`` rows of ``candidates`` (the rest is padding); see :class:`PrivateVotes`."""


# ------------------------------------------------------------------------------------------- tree plumbing
# Between generator calls the samples are cut, gathered and joined on the host in NumPy: classes differ in size,
# and doing it with jnp would compile one small program per shape for microseconds of work (``jax.device_put``
# moves the results back without compiling anything; generators keep receiving JAX arrays).
def host(a) -> np.ndarray:
    return np.asarray(jax.device_get(a))


def tree_take(tree, idx):
    """Rows ``idx`` of every leaf."""
    idx = np.asarray(idx)
    return jax.tree_util.tree_map(lambda a: jax.device_put(host(a)[idx]), tree)


def tree_concat(trees: Sequence[Any]):
    """Leaves of ``trees`` concatenated along the leading axis."""
    return jax.tree_util.tree_map(
        lambda *xs: jax.device_put(np.concatenate([host(x) for x in xs])), *trees
    )


def tree_split(tree, sizes: Sequence[int]) -> list[Any]:
    """Consecutive slices of ``sizes[y]`` rows, one tree per class."""
    bounds = np.cumsum([0, *sizes])
    on_host = jax.tree_util.tree_map(host, tree)
    return [
        jax.tree_util.tree_map(lambda a, s=s, e=e: jax.device_put(a[s:e]), on_host)
        for s, e in itertools.pairwise(bounds)
    ]


def num_rows(tree) -> int:
    return int(jax.tree_util.tree_leaves(tree)[0].shape[0])


# ------------------------------------------------------------------------------------------------ embedding
def embed(embedding: Callable, images, what: str, rows: int | None = None) -> jax.Array:
    """Embeds ``images`` (N, ...) at a padded batch size; returns (rows, D) float32 (rows >= N are padding).

    ``rows`` defaults to ``bucket_size(N)``. Embeddings that do not compile per shape (torch models: their
    ``batch_buckets`` attribute is False) run at N rows, and their output is padded on the host instead.
    """
    n = int(np.shape(images)[0])
    rows = bucket_size(n) if rows is None else max(int(rows), n)
    if getattr(embedding, "batch_buckets", True):
        images = _pad_rows(images, rows)
    emb = embedding(images)
    shape = tuple(np.shape(emb))
    got = int(np.shape(images)[0])
    if len(shape) != 2 or shape[0] != got:
        raise ValueError(
            f"embedding {getattr(embedding, '__name__', embedding)!r} must map {got} inputs to an array of "
            f"shape ({got}, D) for {what}, got {shape}."
        )
    return _pad_rows(_validate.to_device(emb, jnp.float32), rows)


def _pad_rows(x, rows: int):
    """``x`` with its leading axis padded to ``rows`` by repeating its last row."""
    n = int(np.shape(x)[0])
    if n == rows:
        return x
    idx = np.minimum(np.arange(rows), n - 1)
    if _validate.on_host(x):
        return jax.device_put(np.asarray(x)[idx])
    return jnp.take(x, jnp.asarray(idx), axis=0)


def embed_candidates(
    key, samples, label: int, degree: float, *, generator, embedding, lookahead: int, rows: int
) -> jax.Array:
    """(rows, D) float32 embeddings of class ``label``'s m candidates (rows >= m are padding).

    With ``lookahead`` L > 0, a candidate's embedding is the mean embedding of L variations of it (one
    generator call for all L: copy j of candidate i at row j * rows + i, each with its own noise).
    """
    generator = checked(generator)
    m = num_rows(samples)
    if lookahead == 0:
        images = render(generator, samples, rows)
        return embed(embedding, images, f"candidates of class {label}", rows)
    width = rows if batch_buckets(generator) else m  # a JAX generator runs the padded rows too
    tiled = tree_take(samples, np.tile(np.minimum(np.arange(width), m - 1), lookahead))
    varied = vary(key, tiled, label, degree, rows, generator=generator)
    emb = embed(
        embedding,
        render(generator, varied, rows),
        f"lookahead candidates of class {label}",
        lookahead * rows,
    )
    mean = (
        host(emb)[: lookahead * width].reshape(lookahead, width, -1).mean(axis=0, dtype=np.float32)
    )
    return _pad_rows(jax.device_put(mean), rows)


def checked(generator) -> CheckedGenerator:
    """``generator`` wrapped in :class:`pejax.generators.CheckedGenerator` (output checks, retries), unless it
    already is one. The engine's functions accept any pejax generator and call it through this."""
    return generator if isinstance(generator, CheckedGenerator) else CheckedGenerator(generator)


def batch_buckets(generator) -> bool:
    """True for generators that compile per batch size (JAX simulators and models): the engine then calls them
    at padded sizes and trims the result. Remote and torch generators are called with exact sizes."""
    return bool(getattr(generator, "batch_buckets", False))


def _chunked(call: Callable, n: int, rows: int, generator, key=None, tree=None):
    """``call(key_i, rows_i)`` over chunks of ``rows`` rows (the last padded), concatenated and trimmed to n.

    For a batching generator every call then has the one shape ``rows``; chunk i > 0 of a multi-chunk call gets
    ``fold_in(key, i)`` (one chunk keeps ``key``). Other generators get one call of exactly n rows."""
    if not batch_buckets(generator) or rows <= 0:
        return call(key, tree)
    chunks = -(-n // rows)
    padded = None if tree is None else tree_take(tree, np.minimum(np.arange(chunks * rows), n - 1))
    parts = [
        call(
            key if chunks == 1 or key is None else _chunk_key(key, i),
            None if padded is None else tree_take(padded, np.arange(i * rows, (i + 1) * rows)),
        )
        for i in range(chunks)
    ]
    out = parts[0] if chunks == 1 else tree_concat(parts)
    return out if chunks * rows == n else tree_take(out, np.arange(n))


def vary(key, parents, label: int, degree: float, rows: int, *, generator):
    """``generator.variation`` of ``parents`` (n rows); a batching generator runs chunks of ``rows``."""
    return _chunked(
        lambda k, p: generator.variation(k, p, label, degree),
        num_rows(parents),
        rows,
        generator,
        key,
        parents,
    )


def random(key, label: int, n: int, rows: int, *, generator):
    """``generator.random`` of n samples; a batching generator makes chunks of ``rows``."""
    if not batch_buckets(generator) or rows <= 0:
        return generator.random(key, label, n)
    return _chunked(lambda k, _: generator.random(k, label, rows), n, rows, generator, key)


def render(generator, samples, rows: int = 0):
    """What the embedding sees of ``samples`` (checked images, or text bytes); a batching generator renders
    chunks of ``rows`` (default: one call)."""
    return _chunked(
        lambda _, s: generator.render(s), num_rows(samples), rows, generator, tree=samples
    )


# ------------------------------------------------------------------------------------------- private side
class PrivateVotes:
    """The private side of a step: per class, lattice votes of its private embeddings over candidates.

    Each class's private embeddings are one of: a (bucket, D) device array whose first ``n_y`` rows are data
    (built by :meth:`from_embeddings` or :meth:`embed`), a device-mesh-sharded array (``mesh``), or rows of a
    ``.npy`` file streamed in chunks (:meth:`from_stream`). The vote settings come from ``pe`` (k, metric) and
    ``speed`` (block size, precision, backend). Calling it is the only place a step reads private data.
    """

    def __init__(
        self,
        embeddings: Sequence[Any],
        rows: Sequence[int],
        groups: Sequence[np.ndarray | None],
        *,
        pe: PEConfig,
        speed: SpeedConfig,
        mesh=None,
        stream=None,
    ):
        self.embeddings = list(embeddings)
        self.rows = [int(r) for r in rows]
        self.groups = list(groups)
        self.pe, self.speed, self.mesh, self.stream = pe, speed, mesh, stream

    @classmethod
    def embed(cls, images, labels, group_ids, *, embedding, generator, pe, speed, mesh=None):
        """Embeds private ``images`` (n, ...) class by class (the class mask comes before any vote)."""
        generator = checked(generator)
        embeddings, rows, groups = [], [], []
        padded = bucket_size(int(np.bincount(labels, minlength=pe.num_classes).max()))
        for y in range(pe.num_classes):
            mask = labels == y
            if mask.any():
                emb = embed(
                    embedding,
                    _validate.to_device(images[mask]),
                    f"private images of class {y}",
                    padded,
                )
            else:  # a process of a multi-host run holds none of class y: (0, D), D from a public sample
                probe = generator.render(generator.random(jax.random.key(0), y, 1))
                emb = embed(embedding, probe, "a probe sample")[:0]
            embeddings.append(emb)
            rows.append(int(mask.sum()))
            groups.append(None if group_ids is None else np.asarray(group_ids)[mask])
        return cls(embeddings, rows, groups, pe=pe, speed=speed, mesh=mesh)

    @classmethod
    def from_stream(cls, stream, labels, group_ids, *, pe, speed):
        """Class y reads rows ``labels == y`` of the (n, D) ``stream`` (a ``.npy`` path or array) in chunks."""
        idx = [np.flatnonzero(labels == y) for y in range(pe.num_classes)]
        groups = [None if group_ids is None else np.asarray(group_ids)[r] for r in idx]
        return cls(idx, [r.size for r in idx], groups, pe=pe, speed=speed, stream=stream)

    def __call__(self, label: int, candidates: jax.Array, m: int) -> LatticeVotes:
        kw = dict(
            k=self.pe.k,
            metric=self.pe.metric,
            group_ids=self.groups[label],
            block_size=self.speed.block_size,
            precision=self.speed.precision,
        )
        n = self.rows[label]
        if self.stream is not None:
            from pejax.streaming import streamed_lattice_vote_histogram

            return streamed_lattice_vote_histogram(
                self.stream,
                _validate.leading_rows(candidates, m),
                rows=self.embeddings[label],
                backend=self.speed.backend,
                **kw,
            )
        private = self.embeddings[label]
        if self.mesh is not None:
            from pejax.sharding import sharded_lattice_vote_histogram

            return sharded_lattice_vote_histogram(
                _validate.leading_rows(private, n),
                _validate.leading_rows(candidates, m),
                mesh=self.mesh,
                **kw,
            )
        if n == 0:
            return lattice_vote_histogram(
                private, _validate.leading_rows(candidates, m), backend=self.speed.backend, **kw
            )
        return lattice_vote_histogram(
            private,
            candidates,
            num_private=n,
            num_synthetic=m,
            backend=self.speed.backend,
            **kw,
        )


# --------------------------------------------------------------------------------------------- the engine
def init(key: jax.Array, *, generator, class_sizes: Sequence[int]) -> PEState:
    """The RANDOM population: ``class_sizes[y]`` samples of class y from ``fold_in(fold_in(key, 0), y)``.

    Every class shares one padded batch size, ``bucket_size(max(class_sizes))`` (see :func:`random`)."""
    generator = checked(generator)
    sizes = tuple(int(s) for s in class_sizes)
    rows = bucket_size(max(sizes))
    parts = [
        random(
            _keys(key, np.int32(0), np.int32(y))[0],
            y,
            sizes[y],
            rows,
            generator=generator,
        )
        for y in range(len(sizes))
    ]
    return PEState(samples=tree_concat(parts), key=key, iteration=0, class_sizes=sizes)


def final_sizes(pe: PEConfig, class_sizes: Sequence[int]) -> tuple[int, ...]:
    """Samples per class of the released set."""
    f = pe.final_samples_per_class
    return tuple(class_sizes) if f is None else (f,) * len(class_sizes)


def labels(state: PEState, pe: PEConfig) -> np.ndarray:
    """(N,) int32 labels of ``state.samples`` (classes in order; after iteration T the released set's)."""
    sizes = (
        final_sizes(pe, state.class_sizes)
        if state.iteration == pe.iterations
        else state.class_sizes
    )
    return np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)


def step(
    state: PEState,
    votes: ClassVotes,
    *,
    noise_key: NoiseKey,
    generator,
    embedding: Callable,
    pe: PEConfig,
    noise_multiplier: float,
    mechanism: Callable[..., np.ndarray] = release_lattice_votes,
) -> tuple[PEState, StepInfo]:
    """One PE iteration, t = ``state.iteration + 1``: one discrete Gaussian release per class.

    Args:
      state: the state after iteration t - 1.
      votes: the private side (:class:`PrivateVotes`, or any :data:`ClassVotes`).
      noise_key: the secret key of the DP noise; the release of class y uses ``noise_key.fold_in(t, y)``.
      generator: a (checked) generator: ``random``/``variation``/``render``.
      embedding: ``images -> (N, D)``, the same function the private side was embedded with.
      pe: algorithm hyperparameters.
      noise_multiplier: sigma of every vote release, in units of the votes' L2 sensitivity.
      mechanism: ``mechanism(key, lattice_votes, noise_multiplier=sigma) -> (m,) float64`` noisy histogram; the
        default, :func:`pejax.mechanism.release_lattice_votes`, is the exact discrete Gaussian mechanism the
        accountants assume (``pejax audit`` plants broken ones here to check that it catches them).

    Returns:
      ``(new_state, info)``; after iteration T ``new_state.samples`` is the released set.
    """
    generator = checked(generator)
    t = state.iteration + 1
    if t > pe.iterations:
        raise ValueError(
            f"state.iteration is {state.iteration}, already pe.iterations; the run is complete."
        )
    timings = dict.fromkeys(("generation", "embedding", "votes", "selection"), 0.0)
    stats: dict[str, Any] = {
        "noise_multiplier": noise_multiplier,
        "degree": pe.degree(t),
        "surviving_bins": [],
        "uniform_fallback": [],
        "max_votes": [],
    }
    outputs, noisy_all = [], []
    candidates = tree_split(state.samples, state.class_sizes)
    for y, cand in enumerate(candidates):
        out, noisy, fallback, phase = class_step(
            state.key,
            t,
            y,
            cand,
            votes,
            noise_key=noise_key,
            generator=generator,
            embedding=embedding,
            pe=pe,
            class_sizes=state.class_sizes,
            noise_multiplier=noise_multiplier,
            mechanism=mechanism,
        )
        outputs.append(out)
        noisy_all.append(noisy)
        stats["surviving_bins"].append(int((noisy > pe.threshold_sigmas * noise_multiplier).sum()))
        stats["max_votes"].append(float(noisy.max()))
        stats["uniform_fallback"].append(fallback)
        for name, seconds in phase.items():
            timings[name] += seconds
    timings["total"] = sum(timings.values())
    new = dataclasses.replace(state, samples=tree_concat(outputs), iteration=t)
    info = StepInfo(tuple(noisy_all), tuple(candidates), stats, timings, t == pe.iterations)
    return new, info


def class_step(
    key,
    t,
    y,
    cand,
    votes,
    *,
    noise_key,
    generator,
    embedding,
    pe,
    class_sizes,
    noise_multiplier,
    mechanism=release_lattice_votes,
):
    """Votes, noise, selection and variation of class y at iteration t (timed by phase)."""
    m = class_sizes[y]
    rows = bucket_size(max(class_sizes))  # one padded size for every class: one set of programs
    k_look, k_sel, k_var = _keys(key, np.int32(t), np.int32(y))[1:]
    t0 = time.perf_counter()
    emb = embed_candidates(
        k_look,
        cand,
        y,
        pe.degree(t),
        generator=generator,
        embedding=embedding,
        lookahead=pe.lookahead_degree,
        rows=rows,
    )
    emb.block_until_ready()
    t1 = time.perf_counter()
    noisy = mechanism(noise_key.fold_in(t, y), votes(y, emb, m), noise_multiplier=noise_multiplier)
    t2 = time.perf_counter()
    n_parents = num_parents(pe, t, m, final_sizes(pe, class_sizes)[y])
    indices, fallback = select_parents_bucketed(
        k_sel,
        noisy,
        threshold=pe.threshold_sigmas * noise_multiplier,
        num_samples=n_parents,
        mode=pe.selection_mode,
        rows=rows,
    )
    parents = tree_take(cand, indices)
    t3 = time.perf_counter()
    out = offspring(
        k_var,
        t,
        y,
        parents,
        indices,
        generator=generator,
        pe=pe,
        m=m,
        n_parents=n_parents,
        rows=rows,
    )
    t4 = time.perf_counter()
    phase = {"embedding": t1 - t0, "votes": t2 - t1, "selection": t3 - t2, "generation": t4 - t3}
    return out, noisy, fallback, phase


@quick_jit
def _keys(key, a, b):
    """``k = fold_in(fold_in(key, a), b)`` and ``split(k, 3)``: every key the engine derives, one program.

    Initial population of class y: ``k`` at (0, y); iteration t, class y: the split (lookahead, selection,
    variation) at (t, y); chunk i > 0 of a chunked call: ``k`` at (i, 0)."""
    k = jax.random.fold_in(jax.random.fold_in(key, a), b)
    k_look, k_sel, k_var = jax.random.split(k, 3)
    return k, k_look, k_sel, k_var


def _chunk_key(key, i: int):
    return _keys(key, np.int32(i), np.int32(0))[0]


def num_parents(pe: PEConfig, t: int, m: int, final_size: int) -> int:
    """Parents selected from m candidates at iteration t."""
    if t == pe.iterations:
        return final_size if pe.output == "parents" else m
    return max(1, m // pe.variation_folds)


def select_parents_bucketed(
    key, noisy: np.ndarray, *, threshold: float, num_samples: int, mode: str, rows: int
):
    """Parent indices (num_samples,) from ``max(noisy - threshold, 0)``, and whether it fell back to uniform.

    ``mode`` as :func:`pejax.mechanism.select_parents` (``"rank"`` with more parents than bins samples). Runs at
    padded sizes, so that every class and iteration shares one compiled program: the (m,) histogram padded to
    ``rows`` bins that are never drawn, and draws made in chunks of ``rows`` (chunk i > 0 keyed ``fold_in(key,
    i)``) of which the first ``num_samples`` are kept (draws are independent, so they are distributed as
    ``num_samples`` draws).
    """
    m = noisy.shape[0]
    if mode == "rank" and num_samples > m:
        mode = "sample"
    padded = np.full(max(rows, m), -1.0, np.float32)  # padding: below every real bin, never drawn
    padded[:m] = np.maximum(noisy - threshold, 0.0)
    width = padded.shape[0]
    hist = jax.device_put(padded)
    if mode == "rank":
        idx, all_zero = _select(key, hist, np.int32(m), num_samples=width, mode=mode)
        return host(idx)[:num_samples], bool(all_zero)
    # Sampling: chunks of `width` draws (chunk i > 0 keyed fold_in(key, i)), one program for any count.
    chunks = -(-num_samples // width)
    parts = []
    for i in range(chunks):
        k = key if i == 0 else _chunk_key(key, i)
        idx, all_zero = _select(k, hist, np.int32(m), num_samples=width, mode=mode)
        parts.append(host(idx))
    return np.concatenate(parts)[:num_samples], bool(all_zero)


@quick_jit(static_argnames=("num_samples", "mode"))
def _select(key, histogram, num_bins, *, num_samples, mode):
    real = jnp.arange(histogram.shape[0]) < num_bins
    h = jnp.where(real, jnp.maximum(histogram, 0.0), 0.0)
    all_zero = jnp.all(h <= 0)
    if mode == "rank":
        _, idx = jax.lax.top_k(jnp.where(real, h, -1.0), num_samples)
        return idx.astype(jnp.int32), all_zero
    weights = jnp.where(all_zero, real.astype(jnp.float32), h)
    idx = jax.random.categorical(key, jnp.log(weights), shape=(num_samples,))
    return idx.astype(jnp.int32), all_zero


def offspring(key, t, y, parents, indices, *, generator, pe, m, n_parents, rows):
    """Class y's next candidates (or, at t = T, its released samples) from its selected parents."""
    if t == pe.iterations:
        if pe.output == "parents":
            return _final_from_parents(
                key, parents, indices, y, generator=generator, pe=pe, rows=rows
            )
        slots = np.arange(final_sizes(pe, (m,))[0]) % n_parents
        return vary(key, tree_take(parents, slots), y, pe.final_degree, rows, generator=generator)
    slots = np.arange(m) % n_parents
    children = vary(key, tree_take(parents, slots), y, pe.degree(t), rows, generator=generator)
    if not pe.keep_selected:
        return children
    keep = min(n_parents, m)
    return tree_concat(
        [tree_take(parents, np.arange(keep)), tree_take(children, np.arange(keep, m))]
    )


def _final_from_parents(key, parents, indices, label, *, generator, pe, rows):
    """Released set from the last selection: the first copy of each parent as it is, repeats varied."""
    idx = np.asarray(indices)
    first = np.zeros(idx.shape[0], bool)
    first[np.unique(idx, return_index=True)[1]] = True
    if first.all() or pe.final_degree == 0:
        return parents
    varied = vary(key, parents, label, pe.final_degree, rows, generator=generator)

    def pick(a, b):
        mask = first.reshape((-1,) + (1,) * (np.ndim(a) - 1))
        return jax.device_put(np.where(mask, host(a), host(b)))

    return jax.tree_util.tree_map(pick, parents, varied)


__all__ = [
    "ClassVotes",
    "PEState",
    "PrivateVotes",
    "StepInfo",
    "bucket_size",
    "embed",
    "embed_candidates",
    "final_sizes",
    "init",
    "labels",
    "random",
    "render",
    "step",
    "vary",
]
