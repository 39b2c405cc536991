"""The Private Evolution loop: one run, checkpointed after every iteration.

Per class y (classes partition the private data, so they compose in parallel and cost one release together):

  S_0 = RANDOM(y, N_y)
  for t = 1..T:
    e   = embed(S_{t-1}) (or the mean embedding of L lookahead variations)
    h   = lattice_vote_histogram(private_y, e)     # the only access to private data: integer lattice votes
    h~  = h + N_Z(0, sigma^2)                      # one discrete Gaussian release, recorded in the ledger
    p   = select(max(h~ - threshold, 0))           # post-processing
    S_t = VARIATION(p, degree_t)                   # (t < T); at t = T the parents are the output

Two keys, two roles. The *public* ``jax.random`` key given to :meth:`PrivateEvolution.run` drives everything that
is not DP noise (the generator, lookahead, selection): runs with one seed stay comparable. The DP noise is drawn
with a *secret* :class:`pejax.secure_noise.NoiseKey`, by default fresh from the operating system's entropy; it
is never printed, reported or fingerprinted, and is kept only in the (owner-only) checkpoints, so a resumed run
repeats its unbroken run bit for bit. ``privacy.noise_seed`` makes the noise reproducible for research, and such
a run says everywhere that it is not a differentially private release.

What a run releases (``RunResult``, callbacks, reports): the synthetic set and public facts (epsilon, delta,
sigma, schedule, the neighbouring relation), plus per-iteration statistics that are outputs of the discrete
Gaussian mechanism itself (lattice values: noisy counts, noisy histograms) or post-processing of them (surviving
bins, class sizes), and timings, which depend on n and are outside the guarantee. Private data and private
embeddings live only in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import numpy as np

from pejax import _validate
from pejax import accounting
from pejax import checkpoint as ckpt
from pejax import engine
from pejax.accounting import PrivacyLedger
from pejax.accounting import Release
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import SpeedConfig
from pejax.config import to_dict
from pejax.errors import CheckpointMismatchError as CheckpointMismatchError
from pejax.errors import WeakDeltaWarning as WeakDeltaWarning
from pejax.generators._checked import CheckedGenerator
from pejax.mechanism import add_discrete_gaussian_noise
from pejax.secure_noise import NoiseKey
from pejax.votes import NEIGHBORING_RELATION_GROUP
from pejax.votes import NEIGHBORING_RELATION_SAMPLE
from pejax.votes import REPLACE_ONE_GROUP
from pejax.votes import REPLACE_ONE_SAMPLE
from pejax.votes import USER_LATTICE_BITS

TEXT_SUPPORTED = True
"""Text generators (``modality = "text"``, samples = (N, L) uint8 UTF-8 bytes) are supported: the
embedding then receives the byte array instead of images."""

_COUNTS_LABEL = -1
"""``NoiseKey.fold_in(0, _COUNTS_LABEL)`` keys the class-count release; ``fold_in(t, y)`` the votes of (t, y)."""

NOT_DP_NOTICE = (
    "NOT a differentially private release: privacy.noise_seed made the noise reproducible, so anyone who knows "
    "the seed can subtract it. Remove privacy.noise_seed for a private run."
)


@dataclasses.dataclass
class IterationInfo:
    """What callbacks receive after each iteration (and after initialisation, iteration 0).

    Attributes:
      iteration: t (0 for the initial random population).
      images: (N, H, W, C) float32 images of the current population (after iteration T: the released set);
        for text generators the (N, L) uint8 UTF-8 bytes of the texts.
      labels: (N,) int32 labels.
      epsilon: epsilon spent so far under each accountant.
      timings: seconds spent in each phase of this iteration (they depend on n: outside the guarantee).
      stats: per-iteration facts (noise multiplier, surviving bins, uniform fallbacks, degree, noisy maxima).
      final: True for the call with the released synthetic set.
      noisy_histograms: per class, the (m_y,) float64 noisy vote histogram released at this iteration (the
        discrete Gaussian mechanism's output, exact lattice values); ``None`` at iteration 0.
      candidates: per class, the candidates those histograms voted over (generator samples); ``None`` at 0.
      dp_release: False when the noise was reproducible (``privacy.noise_seed``) or zero.
    """

    iteration: int
    images: jax.Array
    labels: np.ndarray
    epsilon: dict[str, float]
    timings: dict[str, float]
    stats: dict[str, Any]
    final: bool = False
    noisy_histograms: tuple[np.ndarray, ...] | None = None
    candidates: tuple[Any, ...] | None = None
    dp_release: bool = True


class RunResult(NamedTuple):
    """Outcome of :meth:`PrivateEvolution.run`.

    Attributes:
      samples: the released synthetic samples (generator pytree, classes in label order).
      images: (N, H, W, C) float32 images of them in [0, 1] (text generators: (N, L) uint8 UTF-8 bytes).
      labels: (N,) int32 labels.
      ledger: every noisy release made.
      noise_multiplier: of each vote-histogram release (in units of the histogram's sensitivity).
      class_sizes: candidates per class.
      history: per-iteration records (timings, stats, epsilon spent).
      resumed_from: iteration of the checkpoint the run resumed from (``None`` for a fresh run).
      dp_release: False when the noise was reproducible (``privacy.noise_seed``) or zero: not a DP release.
      neighboring_relation: the relation the guarantee is stated for (e.g. ``"add_or_remove_one_sample"``).
      delta_rule: how delta was chosen (given, or from a public bound on n, or from the public n).
    """

    samples: Any
    images: jax.Array
    labels: np.ndarray
    ledger: PrivacyLedger
    noise_multiplier: float
    class_sizes: tuple[int, ...]
    history: list[dict]
    resumed_from: int | None
    dp_release: bool = True
    neighboring_relation: str = NEIGHBORING_RELATION_SAMPLE
    delta_rule: str = "given"


class _Plan(NamedTuple):
    """The public privacy plan of a run (computed before any private data is read beyond n and labels)."""

    delta: float
    delta_rule: str
    sigma: float
    sigma_counts: float | None
    relation: str


def _flatten(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "samples" + jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
        for path, leaf in leaves
    }


def allocate(total: int, proportions: Sequence[float], minimum: int) -> tuple[int, ...]:
    """Splits ``total`` over classes in proportion, at least ``minimum`` each (largest remainders)."""
    c = len(proportions)
    spare = total - c * minimum
    if spare < 0:
        raise ValueError(f"cannot give {c} classes {minimum} samples each out of {total}.")
    raw = np.asarray(proportions, np.float64) * spare
    base = np.floor(raw).astype(int)
    order = np.argsort(-(raw - base), kind="stable")
    base[order[: spare - base.sum()]] += 1
    return tuple(int(b) + minimum for b in base)


def check_private_data(
    images,
    labels,
    num_classes: int,
    group_ids=None,
    modality: str = "image",
    require_every_class: bool = True,
):
    """Validates private data and labels (n,) in [0, num_classes).

    ``require_every_class=False`` skips the check that every class has samples (a process of a multi-host run
    may hold none of a class; the runner then checks the counts over all processes).

    Images: (n, H, W, C) float in [0, 1]. Text (``modality="text"``): (n, L) uint8 UTF-8 bytes, zero-padded
    (see :mod:`pejax.generators.text_codec`).
    """
    labels = np.asarray(labels)
    if (
        images is None
    ):  # the private embeddings are streamed from a file: only labels and ids to check
        images = np.zeros((labels.shape[0] if labels.ndim else -1, 0), np.uint8)
        modality = "embeddings"
    images = np.asarray(images)
    if modality == "embeddings":
        pass
    elif modality == "text":
        if images.ndim != 2 or images.dtype != np.uint8 or images.shape[1] == 0:
            raise ValueError(
                f"private texts must be a uint8 array (n, L) of UTF-8 bytes, got {images.dtype} "
                f"{images.shape}. Encode them with pejax.generators.text_codec.encode_texts(texts, max_bytes)."
            )
    elif images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"private images must have shape (n, H, W, C) with C 1 or 3, got {images.shape}. "
            "Add a channel axis for grey images: images[..., None]."
        )
    if modality == "image":
        if not np.issubdtype(images.dtype, np.floating):
            raise TypeError(
                f"private images must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255."
            )
        if not np.isfinite(images).all():
            raise ValueError(
                "private images contain NaN or Inf; repair or drop those images first."
            )
        if images.min() < 0 or images.max() > 1:
            raise ValueError(
                f"private images must lie in [0, 1], got values in [{images.min():g}, {images.max():g}]."
            )
    if labels.ndim != 1 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"private labels must have shape ({images.shape[0]},) (one per image), got {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"private labels must be integers, got dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"private labels must lie in [0, {num_classes}) for pe.num_classes={num_classes}, got values in "
            f"[{labels.min()}, {labels.max()}]. Fix the labels or pe.num_classes."
        )
    if require_every_class:
        _check_every_class(np.bincount(labels, minlength=num_classes))
    if group_ids is not None:
        group_ids = np.asarray(group_ids)
        if group_ids.shape != labels.shape or not np.issubdtype(group_ids.dtype, np.integer):
            raise ValueError(
                f"group_ids must be integers of shape {labels.shape} (one user id per private sample), got "
                f"{group_ids.dtype} {group_ids.shape}."
            )
    if modality == "image":
        images = images.astype(np.float32)
    return images, labels.astype(np.int32), group_ids


def _check_every_class(counts: np.ndarray) -> None:
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise ValueError(
            f"class(es) {empty} have no private samples; their synthetic data would be pure noise. Remove "
            "them (relabel to 0..C-1 and lower pe.num_classes) or add private samples."
        )


def _gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's int64 rows (n_p, w), concatenated in process order (a no-op on one process)."""
    if jax.process_count() == 1:
        return rows
    from pejax.sharding import _process_allgather

    lens = _process_allgather(np.array([rows.shape[0]], np.int64)).ravel()
    padded = np.zeros((int(lens.max()), rows.shape[1]), np.int64)
    padded[: rows.shape[0]] = rows
    every = _process_allgather(padded)
    return np.concatenate([every[p, :n] for p, n in enumerate(lens.tolist())])


def _shared_noise_key(key: NoiseKey) -> NoiseKey:
    """Process 0's key on every process, so that all draw one and the same noise (one release)."""
    if jax.process_count() == 1:
        return key
    from pejax.sharding import _process_allgather

    words = np.frombuffer(bytes.fromhex(key.export_secret()), np.int64)
    first = _process_allgather(words)[0]
    return NoiseKey(first.tobytes(), reproducible=key.reproducible)


def _check_users_in_one_class(pairs: np.ndarray) -> None:
    """``pairs``: (P, 2) unique (user, label) rows over all processes."""
    users, per_user = np.unique(pairs[:, 0], return_counts=True)
    if (per_user > 1).any():
        bad = int(users[per_user > 1][0])
        classes = pairs[pairs[:, 0] == bad, 1].tolist()
        raise ValueError(
            f"user-level privacy needs each user's samples in a single class, but group_ids value {bad} has "
            f"samples in classes {classes}. Split such users into one id per class (this weakens the unit of "
            "privacy to user-and-class), or run at sample level."
        )


class PrivateEvolution:
    """Composes a generator, an embedding and configs into a checkpointed PE run.

    Args:
      generator: a :class:`pejax.generators.Generator` (never sees private data).
      embedding: ``images (N, H, W, C) float32 in [0,1] -> (N, D) float`` pure function, applied to private
        and synthetic images alike.
      pe: algorithm hyperparameters.
      privacy: privacy target, neighbouring relation and noise-key policy.
      speed: speed settings (do not change results).
      checkpoint_dir: folder for checkpoints (``None``: no checkpoints, no resume). Checkpoints hold the secret
        noise key: they are written owner-only and must be kept private.
      callbacks: called with an :class:`IterationInfo` after every iteration.
      progress: show a progress bar (tqdm) over iterations.
      embedding_name: recorded in checkpoints so a resume with another embedding is refused.
      mesh: optional ``jax.sharding.Mesh``: private embeddings are then voted sharded over its devices (and
        hosts, after :func:`pejax.sharding.initialize_distributed`) with identical results; n, the class counts
        and the user checks are aggregated over all processes; only process 0 writes checkpoints. A speed
        setting: it changes neither the votes nor the privacy.
    """

    def __init__(
        self,
        *,
        generator,
        embedding: Callable[[jax.Array], jax.Array],
        pe: PEConfig,
        privacy: PrivacyConfig,
        speed: SpeedConfig | None = None,
        checkpoint_dir: str | pathlib.Path | None = None,
        callbacks: Sequence[Callable[[IterationInfo], None]] = (),
        progress: bool = False,
        embedding_name: str | None = None,
        mesh=None,
    ):
        if not isinstance(pe, PEConfig) or not isinstance(privacy, PrivacyConfig):
            raise TypeError("pe must be a pejax.PEConfig and privacy a pejax.PrivacyConfig.")
        if (
            privacy.class_proportions is not None
            and len(privacy.class_proportions) != pe.num_classes
        ):
            raise ValueError(
                f"privacy.class_proportions has {len(privacy.class_proportions)} entries but pe.num_classes "
                f"is {pe.num_classes}; give one proportion per class."
            )
        if not callable(embedding):
            raise TypeError(f"embedding must be a function images -> (N, D), got {embedding!r}.")
        self.speed = speed or SpeedConfig()
        self.generator = CheckedGenerator(
            generator, retries=self.speed.generator_retries, backoff_s=self.speed.retry_backoff_s
        )
        self.embedding = embedding
        self.embedding_name = embedding_name or getattr(embedding, "__name__", "embedding")
        self.pe = pe
        self.privacy = privacy
        self.checkpoint_dir = None if checkpoint_dir is None else pathlib.Path(checkpoint_dir)
        self.callbacks = tuple(callbacks)
        self.progress = progress
        self.mesh = mesh
        self._noise_plans: dict[float, tuple[float, float | None]] = {}
        if mesh is not None:
            from pejax.neighbors import check_matmul_precision

            check_matmul_precision(self.speed.precision, "PrivateEvolution with a device mesh")
            if self.speed.backend != "xla":
                raise ValueError(
                    f"speed.backend={self.speed.backend!r} searches on the host CPU and cannot vote over a "
                    "device mesh. Use backend 'xla' with a mesh, or run without one."
                )

    # ----------------------------------------------------------------------------------------- privacy
    @property
    def neighboring_relation(self) -> str:
        p = self.privacy
        if p.neighboring == "replace_one":
            return REPLACE_ONE_GROUP if p.user_level else REPLACE_ONE_SAMPLE
        return NEIGHBORING_RELATION_GROUP if p.user_level else NEIGHBORING_RELATION_SAMPLE

    def _vote_release(self, t: int, sigma: float) -> Release:
        """The ledger entry of iteration t's vote histograms (all classes: parallel composition)."""
        replace = self.privacy.neighboring == "replace_one"
        factor = 2 if replace else 1  # a swap may move two classes' histograms
        if self.privacy.user_level:
            lattice_sens, units = float(1 << USER_LATTICE_BITS), None
        else:
            lattice_sens, units = math.sqrt(self.pe.k), self.pe.k
        sens = lattice_sens * math.sqrt(factor)
        return Release(
            iteration=t,
            noise_multiplier=sigma * lattice_sens / sens,
            sensitivity=sens,
            neighboring_relation=self.neighboring_relation,
            mechanism="discrete_gaussian",
            unit_changes=None if units is None else units * factor,
        )

    def _counts_release(self, sigma_counts: float) -> Release:
        factor = 2 if self.privacy.neighboring == "replace_one" else 1
        return Release(
            iteration=0,
            noise_multiplier=sigma_counts / math.sqrt(factor),
            sensitivity=math.sqrt(factor),
            neighboring_relation=self.neighboring_relation,
            description="class counts",
            mechanism="discrete_gaussian",
            unit_changes=factor,
        )

    def _planned(
        self, sigma, sigma_counts, start: int = 0, counts_done: bool = False
    ) -> list[Release]:
        planned = []
        if sigma_counts is not None and not counts_done:
            planned.append(self._counts_release(sigma_counts))
        planned += [
            self._vote_release(t, sigma) for t in range(max(start, 0) + 1, self.pe.iterations + 1)
        ]
        return planned

    def plan_noise(self, delta: float) -> tuple[float, float | None]:
        """Noise multipliers (vote histograms, class counts or ``None`` when proportions are public).

        With ``privacy.epsilon`` alone, the smallest common scale that the accountant itself confirms fits the
        target is found by bisection over the planned discrete Gaussian releases; the class counts get a share
        ``class_count_budget`` of the total precision sum_i sigma_i^-2, as in a Gaussian-DP split.
        """
        p, T = self.privacy, self.pe.iterations
        dp_counts = p.class_proportions is None
        f = p.class_count_budget
        if p.noise_multiplier is not None:
            sigma = p.noise_multiplier
            if not dp_counts:
                return sigma, None
            if sigma == 0:
                return 0.0, 0.0
            return sigma, sigma * math.sqrt((1 - f) / (f * T))
        a, b = (math.sqrt(T / (1 - f)), 1 / math.sqrt(f)) if dp_counts else (math.sqrt(T), None)
        trial = PrivacyLedger(delta=delta)

        def fits(c: float) -> bool:
            planned = self._planned(c * a, None if b is None else c * b)
            try:
                return trial.epsilon_if(planned, p.accountant) <= p.epsilon
            except ValueError as e:  # below accounting's noise floor: far too little noise
                if "composed noise multiplier" in str(e):
                    return False
                raise

        # One Gaussian mechanism at (epsilon, delta) brackets the common scale (replace-one doubles the
        # squared sensitivity).
        c0 = accounting.noise_multiplier(
            epsilon=p.epsilon, iterations=1, delta=delta, accountant="gaussian"
        )
        c0 *= math.sqrt(2) if p.neighboring == "replace_one" else 1.0
        lo, hi = 0.5 * c0, 1.5 * c0
        for _ in range(64):
            if fits(hi):
                break
            lo, hi = hi, 2 * hi
        else:  # pragma: no cover - epsilon and delta are range-checked, so 2^64 more noise always fits
            raise ValueError(f"no noise multiplier reaches privacy.epsilon={p.epsilon:g}.")
        while fits(lo) and lo > 1e-6:
            lo, hi = lo / 2, lo
        while hi - lo > 1e-6 * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi * a, None if b is None else hi * b

    def _delta(self, n: int) -> tuple[float, str]:
        """delta and how it was chosen; under add/remove it never depends on the private n."""
        p = self.privacy
        if p.neighboring == "add_remove" and p.max_private_samples is not None:
            if n > p.max_private_samples:
                raise ValueError(
                    f"privacy.max_private_samples = {p.max_private_samples} is declared as a public upper "
                    "bound on the number of private samples, but the data set is larger. Raise the bound "
                    "(it must not be derived from the private data)."
                )
        if p.delta is not None:
            delta, rule = p.delta, "given"
        elif p.neighboring == "replace_one":
            delta, rule = 1.0 / (n * math.log(n)), "1/(n ln n), n public (replace-one adjacency)"
        elif p.max_private_samples is not None:
            big_n = p.max_private_samples
            delta = 1.0 / (big_n * math.log(big_n))
            rule = f"1/(N ln N) with the public bound N = privacy.max_private_samples = {big_n}"
        else:
            raise ValueError(
                "privacy.delta is not set, and under privacy.neighboring = 'add_remove' the number of private "
                "samples n is private, so delta cannot be derived from it. Set privacy.delta (e.g. 1e-5), or "
                "privacy.max_private_samples (a public upper bound N on n; delta is then 1/(N ln N)), or use "
                "privacy.neighboring = 'replace_one' if n is public."
            )
        accounting._check_delta_range(_validate.delta(delta, "privacy.delta"), "privacy.delta")
        public_n = n if p.neighboring == "replace_one" else p.max_private_samples
        if public_n is not None and delta >= 1.0 / public_n:
            warnings.warn(
                f"privacy.delta={delta:g} is >= 1/n = {1.0 / public_n:g} for n={public_n} (public) samples: such "
                "a delta allows releasing a private sample outright. Use delta well below 1/n, e.g. 1/(n ln n).",
                WeakDeltaWarning,
                stacklevel=3,
            )
        return delta, rule

    def _plan(self, n: int) -> _Plan:
        """The plan for n units; calibration is repeated only for a new delta (it depends on n at most
        through delta, and under add/remove not at all)."""
        delta, rule = self._delta(n)
        if delta not in self._noise_plans:
            self._noise_plans[delta] = self.plan_noise(delta)
        sigma, sigma_counts = self._noise_plans[delta]
        return _Plan(delta, rule, sigma, sigma_counts, self.neighboring_relation)

    # ----------------------------------------------------------------------------------------- helpers
    def _fingerprint(self, key) -> str:
        """Public facts only (configuration, components, public key): never the noise key or private data."""
        doc = {
            "pe": to_dict(self.pe),
            "privacy": to_dict(self.privacy),
            "generator": self.generator.name,
            "embedding": self.embedding_name,
            "key": np.asarray(jax.random.key_data(key)).tolist(),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _data_digest(self, noise_key: NoiseKey, images, labels, group_ids) -> str:
        """Keyed digest of the private data: a resume on changed data would reuse noise, so it is refused."""
        h = hashlib.sha256()
        if isinstance(
            images, str | pathlib.Path
        ):  # a private-embedding file: hashed in 16 MiB reads
            with open(images, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            images = None
        for a in (images, labels, group_ids):
            if a is not None:
                a = np.ascontiguousarray(a)
                h.update(str(a.dtype).encode() + repr(a.shape).encode())
                h.update(a.tobytes() if a.size == 0 else memoryview(a).cast("B"))
        local = noise_key.digest(h.digest())
        every = _gather_rows(np.frombuffer(bytes.fromhex(local), np.int64)[None, :])
        return noise_key.digest(every.tobytes())

    def _restore_samples(self, arrays: dict[str, np.ndarray], key):
        names = sorted(n for n in arrays if n.startswith("samples"))
        try:
            template = jax.eval_shape(lambda k: self.generator.inner.random(k, 0, 1), key)
        except Exception:  # not traceable (e.g. a torch generator): call it for real
            template = self.generator.random(key, 0, 1)
        paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        expected = sorted("samples" + jax.tree_util.keystr(p) for p, _ in paths)
        if expected != names:
            raise CheckpointMismatchError(
                f"checkpoint samples have arrays {names}, but generator {self.generator.name!r} makes "
                f"{expected}; it was written with another generator."
            )
        leaves = [jax.device_put(arrays["samples" + jax.tree_util.keystr(p)]) for p, _ in paths]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def _save(self, t, samples, labels, meta):
        from pejax.sharding import is_checkpoint_writer

        if self.checkpoint_dir is None or not is_checkpoint_writer():
            return
        arrays = _flatten(samples)
        arrays["labels"] = np.asarray(labels, np.int32)
        ckpt.save_checkpoint(self.checkpoint_dir, t, arrays, meta)

    def _notify(self, info: IterationInfo) -> dict[str, float]:
        """Calls every callback; dicts they return are merged into the iteration's ``metrics``."""
        metrics: dict[str, float] = {}
        for cb in self.callbacks:
            out = cb(info)
            if isinstance(out, dict):
                metrics.update({str(k): float(v) for k, v in out.items()})
        return metrics

    # ------------------------------------------------------------- the private side (votes and counts)
    def _private_votes(self, images, labels, group_ids, private_stream) -> engine.PrivateVotes:
        """The step's private side: embeddings by class (the class mask comes before any vote or noise)."""
        if private_stream is not None:
            return engine.PrivateVotes.from_stream(
                private_stream, labels, group_ids, pe=self.pe, speed=self.speed
            )
        return engine.PrivateVotes.embed(
            images,
            labels,
            group_ids,
            embedding=self.embedding,
            generator=self.generator,
            pe=self.pe,
            speed=self.speed,
            mesh=self.mesh,
        )

    def _step(self, state, votes, noise_key: NoiseKey, plan: _Plan, **overrides):
        """One iteration: :func:`pejax.engine.step` (the audit's planted bugs change this call; ``overrides`` are
        passed on, e.g. ``mechanism=``)."""
        return engine.step(
            state,
            votes,
            noise_key=noise_key,
            generator=self.generator,
            embedding=self.embedding,
            pe=self.pe,
            noise_multiplier=plan.sigma,
            **overrides,
        )

    def _global_counts(self, labels, group_ids) -> np.ndarray:
        """Per-class sample counts (or distinct users per class) over all processes, int64."""
        if group_ids is None:
            all_labels = _gather_rows(labels.astype(np.int64)[:, None])[:, 0]
            return np.bincount(all_labels, minlength=self.pe.num_classes)
        pairs = np.unique(_gather_rows(np.stack([group_ids, labels], 1).astype(np.int64)), axis=0)
        return np.bincount(pairs[:, 1], minlength=self.pe.num_classes)

    def _class_sizes(self, noise_key, counts, sigma_counts, ledger):
        pe, priv = self.pe, self.privacy
        if priv.class_proportions is not None:
            props = np.asarray(priv.class_proportions)
            return allocate(pe.samples_per_iteration, props, pe.min_samples_per_class), {
                "class_proportions": props.tolist(),
                "class_proportions_source": "public (given)",
            }
        # Each sample (user) adds 1 to one class count: a discrete Gaussian release on integers.
        noisy = add_discrete_gaussian_noise(
            noise_key.fold_in(0, _COUNTS_LABEL), counts, sigma=sigma_counts
        )
        ledger.record(self._counts_release(sigma_counts))
        props = np.maximum(noisy, 1) / np.maximum(noisy, 1).sum()
        return allocate(pe.samples_per_iteration, props, pe.min_samples_per_class), {
            "noisy_class_counts": [int(c) for c in noisy],
            "class_proportions": props.tolist(),
            "class_proportions_source": f"discrete Gaussian estimate (noise multiplier {sigma_counts:.4g})",
        }

    # --------------------------------------------------------------------------------------------- run
    @ckpt.hold_checkpoint_lock
    def run(
        self,
        key: jax.Array,
        private_images,
        private_labels,
        *,
        group_ids=None,
        resume: bool = False,
        stop_after: int | None = None,
        noise_key: NoiseKey | None = None,
        private_stream=None,
    ) -> RunResult:
        """Runs PE (or resumes it from the newest valid checkpoint when ``resume``).

        Args:
          key: public ``jax.random`` key: the generator, lookahead and selection derive from it (never the noise).
          private_images: (n, H, W, C) float in [0, 1] (text generators: (n, L) uint8 UTF-8 bytes). Only
            embedded, in memory.
          private_labels: (n,) int in [0, num_classes).
          group_ids: (n,) int user ids (required when ``privacy.user_level``).
          resume: continue from the newest valid checkpoint in ``checkpoint_dir`` (with its secret noise key);
            when there is none, start.
          stop_after: stop (checkpointed) after this iteration, for tests and staged runs; resume later.
          noise_key: the secret :class:`pejax.secure_noise.NoiseKey` of the DP noise. Default: from
            ``privacy.noise_seed`` when set (reproducible, not DP), else fresh operating-system entropy.
          private_stream: optional (n, D) private embeddings, one row per private sample in the order of
            ``private_labels``: a ``.npy`` path (e.g. from :func:`pejax.streaming.embed_to_memmap`) or an array.
            The votes then read each class's rows in chunks instead of embedding ``private_images`` (which may be
            ``None``); D must be the embedding dimension of the candidates.

        Returns:
          a :class:`RunResult` (``samples`` is the released set only when the run reached iteration T).

        Raises:
          BudgetExceededError: the planned releases would exceed ``privacy.epsilon``.
          CheckpointMismatchError: the checkpoint belongs to another configuration, generator, key or data.
          FolderInUseError: another run holds ``checkpoint_dir``.
          ForeignCheckpointError: without ``resume``, ``checkpoint_dir`` holds another run's checkpoints.
          GeneratorError: the generator failed permanently (the last checkpoint stays valid).
        """
        _validate.check_key(key)
        if noise_key is not None and not isinstance(noise_key, NoiseKey):
            raise TypeError(
                f"noise_key must be a pejax.secure_noise.NoiseKey or None, got {type(noise_key).__name__}."
            )
        images, labels, group_ids = self._check_inputs(
            private_images, private_labels, group_ids, private_stream
        )
        counts = self._global_counts(labels, group_ids)
        _check_every_class(counts)
        plan = self._plan(int(counts.sum()))
        fingerprint = self._fingerprint(key)
        if not resume and self.checkpoint_dir is not None:
            ckpt.check_no_foreign_checkpoints(self.checkpoint_dir, fingerprint)
        voted = images if private_stream is None else private_stream  # what the digest must cover
        progress = self._resume_or_start(
            key, plan, fingerprint, resume, noise_key, voted, labels, group_ids
        )
        noise_key = progress.noise_key
        if self.privacy.epsilon is not None:
            progress.ledger.check_budget(
                self._planned(
                    plan.sigma,
                    plan.sigma_counts,
                    start=progress.start,
                    counts_done=any(
                        r.description == "class counts" for r in progress.ledger.releases
                    ),
                ),
                epsilon=self.privacy.epsilon,
                accountant=self.privacy.accountant,
            )
        votes = self._private_votes(images, labels, group_ids, private_stream)
        dp_release = not noise_key.reproducible and plan.sigma > 0
        if progress.state is None:
            self._initialise(key, noise_key, counts, plan, progress, dp_release)
        self._loop(votes, plan, progress, stop_after, dp_release)
        return self._result(progress, plan, dp_release)

    def _check_inputs(self, private_images, private_labels, group_ids, private_stream=None):
        priv = self.privacy
        if private_stream is not None:
            from pejax.streaming import private_rows

            if self.mesh is not None:
                raise ValueError(
                    "private_stream cannot be combined with a device mesh yet: stream on one device, or load "
                    "the private embeddings and vote over the mesh."
                )
            n_rows, _ = private_rows(private_stream)
            if n_rows != np.shape(private_labels)[0]:
                raise ValueError(
                    f"private_stream has {n_rows} rows but there are {np.shape(private_labels)[0]} private "
                    "labels: it needs one embedding per private sample, in the labels' order."
                )
        elif private_images is None:
            raise ValueError(
                "private_images is None: give the private data, or private_stream embeddings."
            )
        if priv.user_level and group_ids is None:
            raise ValueError(
                "privacy.user_level=True needs group_ids (one user id per private sample)."
            )
        if not priv.user_level and group_ids is not None:
            raise ValueError(
                "group_ids were given but privacy.user_level is False; set it to True for user-level DP."
            )
        images, labels, group_ids = check_private_data(
            private_images,
            private_labels,
            self.pe.num_classes,
            group_ids,
            modality=self.generator.modality,
            require_every_class=False,
        )
        if group_ids is not None:
            # Per-class histograms compose in parallel only if a user's samples all lie in one class; a user
            # spread over c classes would move c histograms (sensitivity sqrt(c)) and c class counts. Checked
            # over the users of every process.
            pairs = _gather_rows(np.stack([np.asarray(group_ids), labels], 1).astype(np.int64))
            _check_users_in_one_class(np.unique(pairs, axis=0))
        return images, labels, group_ids

    def _resume_or_start(
        self, key, plan, fingerprint, resume, noise_key, images, labels, group_ids
    ):
        progress = _Progress(start=0, state=None, ledger=None, history=[], resumed_from=None)
        found = None
        if resume and self.checkpoint_dir is not None:
            found = ckpt.latest_valid_checkpoint(self.checkpoint_dir)
        if found is not None:
            path, arrays, meta = found
            if meta.get("fingerprint") != fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint {str(path)!r} was written by a run with another configuration, "
                    "generator, embedding or key; resume with the same settings, or use a new "
                    "checkpoint folder."
                )
            stored = NoiseKey.import_secret(
                meta["noise_key"], reproducible=bool(meta.get("noise_key_reproducible"))
            )
            if noise_key is not None and noise_key != stored:
                raise CheckpointMismatchError(
                    f"checkpoint {str(path)!r} was written with another noise key; a resume continues with "
                    "the checkpoint's own key: pass no noise_key."
                )
            noise_key = _shared_noise_key(stored)
            progress.data_digest = self._data_digest(noise_key, images, labels, group_ids)
            if meta.get("data_digest") != progress.data_digest:
                raise CheckpointMismatchError(
                    f"checkpoint {str(path)!r} was written for other private data; resuming would draw the "
                    "same noise for different data (which would reveal their difference). Resume with the "
                    "same private data, or start a new run in a new checkpoint folder."
                )
            progress.start = progress.resumed_from = int(meta["iteration"])
            progress.ledger = PrivacyLedger.from_json(meta["ledger"])
            progress.history = list(meta["history"])
            progress.state = engine.PEState(
                samples=self._restore_samples(arrays, key),
                key=key,
                iteration=progress.start,
                class_sizes=tuple(int(s) for s in meta["class_sizes"]),
            )
        else:
            if noise_key is None:
                seed = self.privacy.noise_seed
                noise_key = NoiseKey.generate() if seed is None else NoiseKey.from_seed(seed)
            noise_key = _shared_noise_key(noise_key)
            progress.ledger = PrivacyLedger(delta=plan.delta)
            progress.data_digest = self._data_digest(noise_key, images, labels, group_ids)
        progress.noise_key = noise_key
        progress.fingerprint = fingerprint
        return progress

    def _meta(self, t: int, progress: _Progress, plan: _Plan) -> dict:
        return {
            "iteration": t,
            "ledger": progress.ledger.to_json(),
            "class_sizes": [int(s) for s in progress.state.class_sizes],
            "history": progress.history,
            "fingerprint": progress.fingerprint,
            "noise_multiplier": plan.sigma,
            # Private: the checkpoint is an owner-only artifact (see pejax.checkpoint).
            "noise_key": progress.noise_key.export_secret(),
            "noise_key_reproducible": progress.noise_key.reproducible,
            "data_digest": progress.data_digest,
        }

    def _initialise(self, key, noise_key, counts, plan, progress, dp_release) -> None:
        t0 = time.perf_counter()
        sizes, stats = self._class_sizes(noise_key, counts, plan.sigma_counts, progress.ledger)
        progress.state = state = engine.init(key, generator=self.generator, class_sizes=sizes)
        timings = {"generation": time.perf_counter() - t0}
        record = {
            "iteration": 0,
            "timings": timings,
            "stats": stats,
            "epsilon": progress.ledger.epsilons(),
        }
        labels = engine.labels(state, self.pe)
        images = engine.render(
            self.generator, state.samples, engine.bucket_size(max(state.class_sizes))
        )
        info = IterationInfo(
            0, images, labels, record["epsilon"], timings, stats, dp_release=dp_release
        )
        record["metrics"] = self._notify(info)
        progress.history.append(record)
        self._save(0, state.samples, labels, self._meta(0, progress, plan))

    def _loop(self, votes, plan, progress, stop_after, dp_release) -> None:
        """Iterations start+1..T (or up to ``stop_after``), each checkpointed."""
        bar = self._progress_bar(progress.start, dp_release)
        last = self.pe.iterations if stop_after is None else min(stop_after, self.pe.iterations)
        while progress.state.iteration < last:
            state, step = self._step(progress.state, votes, progress.noise_key, plan)
            t = state.iteration
            progress.ledger.record(self._vote_release(t, plan.sigma))
            record = {
                "iteration": t,
                "timings": step.timings,
                "stats": step.stats,
                "epsilon": progress.ledger.epsilons(),
            }
            labels = engine.labels(state, self.pe)
            info = IterationInfo(
                t,
                engine.render(
                    self.generator, state.samples, engine.bucket_size(max(state.class_sizes))
                ),
                labels,
                record["epsilon"],
                step.timings,
                step.stats,
                final=step.final,
                noisy_histograms=step.noisy_histograms,
                candidates=step.candidates,
                dp_release=dp_release,
            )
            record["metrics"] = self._notify(info)
            progress.history.append(record)
            progress.state = state
            self._save(t, state.samples, labels, self._meta(t, progress, plan))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(self._bar_postfix(record))
        if bar is not None:
            bar.close()

    def _progress_bar(self, start: int, dp_release: bool):
        if not self.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the demo extra
            return None
        desc = "PE iterations" if dp_release else "PE iterations (NOT DP: reproducible noise)"
        return tqdm(total=self.pe.iterations, initial=start, desc=desc, unit="it")

    def _bar_postfix(self, record: dict) -> dict[str, str]:
        """epsilon spent, and a remote generator's totals (requests, retries, tokens, cost) when it counts them."""
        out = {"eps": f"{record['epsilon'][self.privacy.accountant]:.3g}"}
        usage = getattr(self.generator.inner, "usage", None)
        if callable(usage):
            u = usage()
            out |= {
                "req": str(int(u.get("requests", 0))),
                "retries": str(int(u.get("retries", 0))),
                "tok": str(int(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0))),
                "cost": f"{u.get('cost', 0.0):.4g}",
            }
        return out

    def _result(self, progress, plan, dp_release) -> RunResult:
        state = progress.state
        return RunResult(
            samples=state.samples,
            images=engine.render(
                self.generator, state.samples, engine.bucket_size(max(state.class_sizes))
            ),
            labels=engine.labels(state, self.pe),
            ledger=progress.ledger,
            noise_multiplier=plan.sigma,
            class_sizes=state.class_sizes,
            history=progress.history,
            resumed_from=progress.resumed_from,
            dp_release=dp_release,
            neighboring_relation=plan.relation,
            delta_rule=plan.delta_rule,
        )


@dataclasses.dataclass
class _Progress:
    """Mutable driver state of one run: the engine's state plus what a checkpoint restores around it."""

    start: int
    state: engine.PEState | None
    ledger: PrivacyLedger | None
    history: list[dict]
    resumed_from: int | None
    noise_key: NoiseKey | None = None
    fingerprint: str = ""
    data_digest: str = ""
