"""The Private Evolution loop: one run, checkpointed after every iteration.

Per class y (classes partition the private data, so they compose in parallel and cost one release together):

  S_0 = RANDOM(y, N_y)
  for t = 1..T:
    e   = embed(S_{t-1}) (or the mean embedding of L lookahead variations)
    h   = vote_histogram(private_y, e)            # the only access to private data
    h~  = h + N(0, sigma^2)                       # one Gaussian release, recorded in the ledger
    p   = select(max(h~ - threshold, 0))          # post-processing
    S_t = VARIATION(p, degree_t)                  # (t < T); at t = T the parents are the output

Randomness: every random step uses ``fold_in(key, t)`` then ``fold_in(., y)`` and a fixed split, so a run is a
pure function of (key, configs, generator, private data), and a resumed run repeats an unbroken one bit for
bit. Private data and private embeddings live only in memory: checkpoints hold the synthetic samples, the
noisy (already released) class counts and the ledger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
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
import jax.numpy as jnp
import numpy as np

from pejax import _validate
from pejax import accounting
from pejax import checkpoint as ckpt
from pejax.accounting import PrivacyLedger
from pejax.accounting import Release
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import SpeedConfig
from pejax.config import to_dict
from pejax.generators._checked import CheckedGenerator
from pejax.mechanism import PejaxWarning
from pejax.mechanism import add_gaussian_noise
from pejax.mechanism import select_parents
from pejax.mechanism import threshold
from pejax.votes import NEIGHBORING_RELATION_GROUP
from pejax.votes import NEIGHBORING_RELATION_SAMPLE
from pejax.votes import vote_histogram

TEXT_SUPPORTED = True
"""Text generators (``modality = "text"``, samples = (N, L) uint8 UTF-8 bytes) are supported: the
embedding then receives the byte array instead of images."""

# fold_in streams of the root key.
_STREAM_COUNTS = 1_000_003
_STREAM_FINAL = 1_000_033


class WeakDeltaWarning(PejaxWarning):
    """delta >= 1/n: a mechanism could then publish a private sample outright and still meet (epsilon, delta)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with another configuration, generator or key."""


@dataclasses.dataclass
class IterationInfo:
    """What callbacks receive after each iteration (and after initialisation, iteration 0).

    Attributes:
      iteration: t (0 for the initial random population).
      images: (N, H, W, C) float32 images of the current population (after iteration T: the released set);
        for text generators the (N, L) uint8 UTF-8 bytes of the texts.
      labels: (N,) int32 labels.
      epsilon: epsilon spent so far under each accountant.
      timings: seconds spent in each phase of this iteration.
      stats: per-iteration facts (noise multiplier, surviving bins, uniform fallbacks, degree).
      final: True for the call with the released synthetic set.
    """

    iteration: int
    images: jax.Array
    labels: np.ndarray
    epsilon: dict[str, float]
    timings: dict[str, float]
    stats: dict[str, Any]
    final: bool = False


class RunResult(NamedTuple):
    """Outcome of :meth:`PrivateEvolution.run`.

    Attributes:
      samples: the released synthetic samples (generator pytree, classes in label order).
      images: (N, H, W, C) float32 images of them in [0, 1] (text generators: (N, L) uint8 UTF-8 bytes).
      labels: (N,) int32 labels.
      ledger: every noisy release made.
      noise_multiplier: of each vote-histogram release.
      class_sizes: candidates per class.
      history: per-iteration records (timings, stats, epsilon spent).
      resumed_from: iteration of the checkpoint the run resumed from (``None`` for a fresh run).
    """

    samples: Any
    images: jax.Array
    labels: np.ndarray
    ledger: PrivacyLedger
    noise_multiplier: float
    class_sizes: tuple[int, ...]
    history: list[dict]
    resumed_from: int | None


def _tree_take(tree, idx):
    idx = jnp.asarray(idx)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[idx], tree)


def _tree_concat(trees: Sequence[Any]):
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *trees)


def _tree_slices(tree, sizes: Sequence[int]):
    bounds = np.cumsum([0, *sizes])
    return [
        jax.tree_util.tree_map(lambda a, s=s, e=e: jnp.asarray(a)[s:e], tree)
        for s, e in itertools.pairwise(bounds)
    ]


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


def check_private_data(images, labels, num_classes: int, group_ids=None, modality: str = "image"):
    """Validates private data and labels (n,) in [0, num_classes).

    Images: (n, H, W, C) float in [0, 1]. Text (``modality="text"``): (n, L) uint8 UTF-8 bytes, zero-padded
    (see :mod:`pejax.generators.text_codec`).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if modality == "text":
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
    if labels.shape != (images.shape[0],):
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
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise ValueError(
            f"class(es) {empty} have no private samples; their synthetic data would be pure noise. Remove "
            "them (relabel to 0..C-1 and lower pe.num_classes) or add private samples."
        )
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


class PrivateEvolution:
    """Composes a generator, an embedding and configs into a checkpointed PE run.

    Args:
      generator: a :class:`pejax.generators.Generator` (never sees private data).
      embedding: ``images (N, H, W, C) float32 in [0,1] -> (N, D) float`` pure function, applied to private
        and synthetic images alike.
      pe: algorithm hyperparameters.
      privacy: privacy target.
      speed: speed settings (do not change results).
      checkpoint_dir: folder for checkpoints (``None``: no checkpoints, no resume).
      callbacks: called with an :class:`IterationInfo` after every iteration.
      progress: show a progress bar (tqdm) over iterations.
      embedding_name: recorded in checkpoints so a resume with another embedding is refused.
      mesh: optional ``jax.sharding.Mesh``: private embeddings are then voted sharded over its devices (and
        hosts, after :func:`pejax.sharding.initialize_distributed`) with identical results; only process 0
        writes checkpoints. A speed setting: it changes neither the votes nor the privacy.
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
        if mesh is not None:
            from pejax.neighbors import check_matmul_precision

            check_matmul_precision(self.speed.precision, "PrivateEvolution with a device mesh")

    # ----------------------------------------------------------------------------------------- privacy
    def plan_noise(self, delta: float) -> tuple[float, float | None]:
        """Noise multipliers (vote histograms, class counts or ``None`` when proportions are public)."""
        p, T = self.privacy, self.pe.iterations
        dp_counts = p.class_proportions is None
        f = p.class_count_budget
        if p.noise_multiplier is not None:
            sigma = p.noise_multiplier
            if not dp_counts:
                return sigma, None
            if sigma == 0:
                return 0.0, 0.0
            # The counts get a share f of the total precision sum_i sigma_i^-2.
            return sigma, sigma * math.sqrt((1 - f) / (f * T))
        # One Gaussian mechanism with multiplier s_eff at (epsilon, delta) composes exactly like releases
        # sigma_i with sum sigma_i^-2 = s_eff^-2 (for PLD, RDP and the closed form alike).
        s_eff = accounting.noise_multiplier(
            epsilon=p.epsilon, iterations=1, delta=delta, accountant=p.accountant
        )
        if not dp_counts:
            sigma, sigma_counts = s_eff * math.sqrt(T), None
        else:
            sigma, sigma_counts = s_eff * math.sqrt(T / (1 - f)), s_eff / math.sqrt(f)
        # PLD discretises each distinct mechanism separately, so the split can land a hair above the target:
        # step the noise up until the accountant itself confirms the plan fits.
        relation = NEIGHBORING_RELATION_GROUP if p.user_level else NEIGHBORING_RELATION_SAMPLE
        trial = PrivacyLedger(delta=delta)
        while (
            trial.epsilon_if(self._planned(sigma, sigma_counts, relation, 0), p.accountant)
            > p.epsilon
        ):
            sigma *= 1 + 1e-5
            sigma_counts = None if sigma_counts is None else sigma_counts * (1 + 1e-5)
        return sigma, sigma_counts

    def _planned(
        self, sigma, sigma_counts, relation, start: int, counts_done: bool = False
    ) -> list[Release]:
        planned = []
        if sigma_counts is not None and not counts_done:
            planned.append(
                Release(
                    iteration=0,
                    noise_multiplier=sigma_counts,
                    neighboring_relation=relation,
                    description="class counts",
                )
            )
        planned += [
            Release(iteration=t, noise_multiplier=sigma, neighboring_relation=relation)
            for t in range(max(start, 0) + 1, self.pe.iterations + 1)
        ]
        return planned

    # ----------------------------------------------------------------------------------------- helpers
    def _fingerprint(self, key) -> str:
        doc = {
            "pe": to_dict(self.pe),
            "privacy": to_dict(self.privacy),
            "generator": self.generator.name,
            "embedding": self.embedding_name,
            "key": np.asarray(jax.random.key_data(key)).tolist(),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _embed(self, images, what: str) -> jax.Array:
        emb = self.embedding(images)
        shape = tuple(np.shape(emb))
        if len(shape) != 2 or shape[0] != images.shape[0]:
            raise ValueError(
                f"embedding {self.embedding_name!r} must map {images.shape[0]} images to an array of shape "
                f"({images.shape[0]}, D) for {what}, got {shape}."
            )
        return jnp.asarray(emb, jnp.float32)

    def _embed_candidates(self, key, samples, label, degree) -> jax.Array:
        L = self.pe.lookahead_degree
        if L == 0:
            return self._embed(self.generator.render(samples), f"candidates of class {label}")
        # One call for all L variations: the candidates tiled L times (copy j of candidate i at row
        # j * n + i). Each row gets its own noise, so this is L independent variations of each candidate,
        # with one dispatch (and one output check) instead of L.
        n = jax.tree_util.tree_leaves(samples)[0].shape[0]
        tiled = _tree_take(samples, np.tile(np.arange(n), L))
        var = self.generator.variation(key, tiled, label, degree)
        emb = self._embed(self.generator.render(var), f"lookahead candidates of class {label}")
        return emb.reshape(L, n, emb.shape[1]).mean(axis=0)

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
        leaves = [jnp.asarray(arrays["samples" + jax.tree_util.keystr(p)]) for p, _ in paths]
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
    ) -> RunResult:
        """Runs PE (or resumes it from the newest valid checkpoint when ``resume``).

        Args:
          key: ``jax.random`` key; the whole run is a function of it.
          private_images: (n, H, W, C) float in [0, 1] (text generators: (n, L) uint8 UTF-8 bytes). Only
            embedded, in memory.
          private_labels: (n,) int in [0, num_classes).
          group_ids: (n,) int user ids (required when ``privacy.user_level``).
          resume: continue from the newest valid checkpoint in ``checkpoint_dir``; when there is none, start.
          stop_after: stop (checkpointed) after this iteration, for tests and staged runs; resume later.

        Returns:
          a :class:`RunResult` (``samples`` is the released set only when the run reached iteration T).

        Raises:
          BudgetExceededError: the planned releases would exceed ``privacy.epsilon``.
          CheckpointMismatchError: the checkpoint belongs to another configuration, generator or key.
          GeneratorError: the generator failed permanently (the last checkpoint stays valid).
        """
        pe, priv = self.pe, self.privacy
        if not isinstance(key, jax.Array) or not (
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,)
        ):
            raise TypeError(
                f"key must be a jax.random key (e.g. jax.random.key(0)), got {type(key).__name__}."
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
            pe.num_classes,
            group_ids,
            modality=self.generator.modality,
        )
        if group_ids is not None:
            # Per-class histograms compose in parallel only if a user's samples all lie in one class; a user
            # spread over c classes would move c histograms (sensitivity sqrt(c)) and c class counts.
            pairs = np.unique(np.stack([np.asarray(group_ids), labels]), axis=1)
            users, per_user = np.unique(pairs[0], return_counts=True)
            if (per_user > 1).any():
                bad = int(users[per_user > 1][0])
                classes = pairs[1][pairs[0] == bad].tolist()
                raise ValueError(
                    f"user-level privacy needs each user's samples in a single class, but group_ids value {bad} "
                    f"has samples in classes {classes}. Split such users into one id per class (this "
                    "weakens the unit of privacy to user-and-class), or run at sample level."
                )
        n = images.shape[0]
        delta = priv.delta if priv.delta is not None else 1.0 / (n * math.log(n))
        _validate.delta(delta, "privacy.delta")
        if delta >= 1.0 / n:
            warnings.warn(
                f"privacy.delta={delta:g} is >= 1/n = {1.0 / n:g} for n={n} private samples: such a delta "
                "allows releasing a private sample outright. Use delta well below 1/n, e.g. 1/(n ln n) "
                "(the default when privacy.delta is not set).",
                WeakDeltaWarning,
                stacklevel=2,
            )
        relation = NEIGHBORING_RELATION_GROUP if priv.user_level else NEIGHBORING_RELATION_SAMPLE
        sigma, sigma_counts = self.plan_noise(delta)
        fingerprint = self._fingerprint(key)
        if not resume and self.checkpoint_dir is not None:
            ckpt.check_no_foreign_checkpoints(self.checkpoint_dir, fingerprint)

        # ---- resume or start
        start, samples, ledger, sizes, history, resumed_from = 0, None, None, None, [], None
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
                start = resumed_from = int(meta["iteration"])
                ledger = PrivacyLedger.from_json(meta["ledger"])
                sizes = tuple(meta["class_sizes"])
                history = list(meta["history"])
                samples = self._restore_samples(arrays, key)

        if ledger is None:
            ledger = PrivacyLedger(delta=delta)
        if priv.epsilon is not None:
            ledger.check_budget(
                self._planned(
                    sigma,
                    sigma_counts,
                    relation,
                    start,
                    counts_done=any(r.description == "class counts" for r in ledger.releases),
                ),
                epsilon=priv.epsilon,
                accountant=priv.accountant,
            )

        per_class_priv = []
        for y in range(pe.num_classes):
            mask = labels == y
            emb = self._embed(jnp.asarray(images[mask]), f"private images of class {y}")
            per_class_priv.append((emb, None if group_ids is None else np.asarray(group_ids)[mask]))

        if samples is None:
            t0 = time.perf_counter()
            sizes, counts_stats = self._class_sizes(
                key, labels, sigma_counts, ledger, relation, group_ids
            )
            parts = []
            for y in range(pe.num_classes):
                k_y = jax.random.fold_in(jax.random.fold_in(key, 0), y)
                parts.append(self.generator.random(k_y, y, sizes[y]))
            samples = _tree_concat(parts)
            timings = {"generation": time.perf_counter() - t0}
            record = {
                "iteration": 0,
                "timings": timings,
                "stats": counts_stats,
                "epsilon": ledger.epsilons(),
            }
            label_arr = np.repeat(np.arange(pe.num_classes), sizes).astype(np.int32)
            record["metrics"] = self._notify(
                IterationInfo(
                    0,
                    self.generator.render(samples),
                    label_arr,
                    record["epsilon"],
                    timings,
                    counts_stats,
                )
            )
            history.append(record)
            self._save(
                0, samples, label_arr, self._meta(0, ledger, sizes, history, fingerprint, sigma)
            )
        label_arr = np.repeat(np.arange(pe.num_classes), sizes).astype(np.int32)

        iterations = range(start + 1, pe.iterations + 1)
        bar = None
        if self.progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=pe.iterations, initial=start, desc="PE iterations", unit="it")
            except ImportError:  # pragma: no cover - tqdm is in the demo extra
                bar = None
        final_samples = None
        for t in iterations:
            if stop_after is not None and t > stop_after:
                break
            samples, record, final_samples = self._iteration(
                key, t, samples, sizes, per_class_priv, sigma, relation, ledger
            )
            out_samples = final_samples if final_samples is not None else samples
            out_labels = (
                np.asarray(self._final_labels(sizes)) if final_samples is not None else label_arr
            )
            record["metrics"] = self._notify(
                IterationInfo(
                    t,
                    self.generator.render(out_samples),
                    out_labels,
                    record["epsilon"],
                    record["timings"],
                    record["stats"],
                    final=final_samples is not None,
                )
            )
            history.append(record)
            meta = self._meta(t, ledger, sizes, history, fingerprint, sigma)
            self._save(t, out_samples, out_labels, meta)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(eps=f"{record['epsilon'][priv.accountant]:.3g}")
        if bar is not None:
            bar.close()

        done = len(ledger.releases) and max(r.iteration for r in ledger.releases) == pe.iterations
        if final_samples is None and done and start == pe.iterations:
            # Resumed from the final checkpoint: its samples are already the released set.
            final_samples = samples
            final_labels = np.asarray(arrays["labels"])
        elif final_samples is not None:
            final_labels = np.asarray(self._final_labels(sizes))
        else:
            final_samples, final_labels = samples, label_arr
        return RunResult(
            samples=final_samples,
            images=self.generator.render(final_samples),
            labels=final_labels,
            ledger=ledger,
            noise_multiplier=sigma,
            class_sizes=tuple(sizes),
            history=history,
            resumed_from=resumed_from,
        )

    def _meta(self, t, ledger, sizes, history, fingerprint, sigma) -> dict:
        return {
            "iteration": t,
            "ledger": ledger.to_json(),
            "class_sizes": [int(s) for s in sizes],
            "history": history,
            "fingerprint": fingerprint,
            "noise_multiplier": sigma,
        }

    def _final_sizes(self, sizes) -> tuple[int, ...]:
        f = self.pe.final_samples_per_class
        return tuple(sizes) if f is None else (f,) * len(sizes)

    def _final_labels(self, sizes) -> np.ndarray:
        """Labels of the released set, classes in order: ``_final_sizes(sizes)[y]`` of class y."""
        return np.repeat(np.arange(self.pe.num_classes), self._final_sizes(sizes)).astype(np.int32)

    def _class_sizes(self, key, labels, sigma_counts, ledger, relation, group_ids=None):
        pe, priv = self.pe, self.privacy
        if priv.class_proportions is not None:
            props = np.asarray(priv.class_proportions)
            return allocate(pe.samples_per_iteration, props, pe.min_samples_per_class), {
                "class_proportions": props.tolist(),
                "class_proportions_source": "public (given)",
            }
        if group_ids is None:
            counts = np.bincount(labels, minlength=pe.num_classes).astype(np.float32)
        else:
            # User level: count distinct users per class (each user lies in one class, checked in run()),
            # so adding or removing a user changes one count by 1: L2 sensitivity 1.
            pairs = np.unique(np.stack([labels, np.asarray(group_ids)]), axis=1)
            counts = np.bincount(pairs[0], minlength=pe.num_classes).astype(np.float32)
        noisy = np.asarray(
            add_gaussian_noise(
                jax.random.fold_in(key, _STREAM_COUNTS),
                jnp.asarray(counts),
                noise_multiplier=sigma_counts,
            )
        )
        ledger.record(
            Release(
                iteration=0,
                noise_multiplier=sigma_counts,
                neighboring_relation=relation,
                description="class counts",
            )
        )
        props = np.maximum(noisy, 1.0) / np.maximum(noisy, 1.0).sum()
        return allocate(pe.samples_per_iteration, props, pe.min_samples_per_class), {
            "noisy_class_counts": noisy.tolist(),
            "class_proportions": props.tolist(),
            "class_proportions_source": f"DP estimate (noise multiplier {sigma_counts:.4g})",
        }

    def _iteration(self, key, t, samples, sizes, per_class_priv, sigma, relation, ledger):
        pe = self.pe
        timings = {"generation": 0.0, "embedding": 0.0, "votes": 0.0, "selection": 0.0}
        stats: dict[str, Any] = {
            "noise_multiplier": sigma,
            "degree": pe.degree(t),
            "surviving_bins": [],
            "uniform_fallback": [],
            "max_votes": [],
        }
        last = t == pe.iterations
        final_sizes = self._final_sizes(sizes)
        kt = jax.random.fold_in(key, t)
        new_parts, final_parts = [], []
        for y, cand in enumerate(_tree_slices(samples, sizes)):
            k_look, k_noise, k_sel, k_var = jax.random.split(jax.random.fold_in(kt, y), 4)
            degree = pe.degree(t)
            t0 = time.perf_counter()
            emb = self._embed_candidates(k_look, cand, y, degree)
            emb.block_until_ready()
            t1 = time.perf_counter()
            priv_emb, groups = per_class_priv[y]
            if self.mesh is None:
                hist = vote_histogram(
                    priv_emb,
                    emb,
                    k=pe.k,
                    metric=pe.metric,
                    group_ids=groups,
                    block_size=self.speed.block_size,
                    precision=self.speed.precision,
                )
            else:
                from pejax.sharding import sharded_vote_histogram

                hist = sharded_vote_histogram(
                    priv_emb,
                    emb,
                    mesh=self.mesh,
                    k=pe.k,
                    metric=pe.metric,
                    group_ids=groups,
                    block_size=self.speed.block_size,
                    precision=self.speed.precision,
                )
            noisy = add_gaussian_noise(k_noise, hist, noise_multiplier=sigma)
            kept = threshold(noisy, threshold=pe.threshold_sigmas * sigma)
            kept.block_until_ready()
            t2 = time.perf_counter()
            stats["surviving_bins"].append(int((kept > 0).sum()))
            stats["max_votes"].append(float(noisy.max()))
            n_parents = sizes[y] if last else max(1, sizes[y] // pe.variation_folds)
            if last and pe.output == "parents":
                n_parents = final_sizes[y]
            mode = pe.selection_mode
            if mode == "rank" and n_parents > sizes[y]:
                mode = "sample"
            sel = select_parents(k_sel, kept, num_samples=n_parents, mode=mode)
            stats["uniform_fallback"].append(bool(sel.uniform_fallback))
            parents = _tree_take(cand, sel.indices)
            t3 = time.perf_counter()
            if last and pe.output == "parents":
                final_parts.append(self._final_from_parents(k_var, parents, sel.indices, y))
            elif last:
                slots = np.arange(final_sizes[y]) % n_parents
                final_parts.append(
                    self.generator.variation(k_var, _tree_take(parents, slots), y, pe.final_degree)
                )
            else:
                slots = np.arange(sizes[y]) % n_parents
                children = self.generator.variation(k_var, _tree_take(parents, slots), y, degree)
                if pe.keep_selected:
                    keep = min(n_parents, sizes[y])
                    children = _tree_concat(
                        [
                            _tree_take(parents, np.arange(keep)),
                            _tree_take(children, np.arange(keep, sizes[y])),
                        ]
                    )
                new_parts.append(children)
            t4 = time.perf_counter()
            timings["embedding"] += t1 - t0
            timings["votes"] += t2 - t1
            timings["selection"] += t3 - t2
            timings["generation"] += t4 - t3
        ledger.record(Release(iteration=t, noise_multiplier=sigma, neighboring_relation=relation))
        timings["total"] = sum(timings.values())
        record = {"iteration": t, "timings": timings, "stats": stats, "epsilon": ledger.epsilons()}
        if last:
            return samples, record, _tree_concat(final_parts)
        return _tree_concat(new_parts), record, None

    def _final_from_parents(self, key, parents, indices, label):
        """Released set from the last selection: the first copy of each parent as it is, repeats varied."""
        idx = np.asarray(indices)
        first = np.zeros(idx.shape[0], bool)
        first[np.unique(idx, return_index=True)[1]] = True
        if first.all() or self.pe.final_degree == 0:
            return parents
        varied = self.generator.variation(key, parents, label, self.pe.final_degree)
        mask = jnp.asarray(first)

        def pick(a, b):
            m = mask.reshape((-1,) + (1,) * (jnp.ndim(a) - 1))
            return jnp.where(m, a, b)

        return jax.tree_util.tree_map(pick, parents, varied)
