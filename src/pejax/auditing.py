"""Empirical privacy auditing of the vote-histogram mechanism and of a short PE loop.

An audit runs a mechanism many times on two neighbouring private data sets, D (without) and D' = D + canary
(with), scores every output with a distinguishing test, and turns the two score samples into an empirical
lower bound on epsilon that holds with a stated confidence. The bound comes from jax-privacy's
:class:`jax_privacy.auditing.CanaryScoreAuditor`; this module writes no epsilon bound of its own.

What is audited (the *transcript*, everything an adversary sees of one run):

* ``iterations = 1``: one release of the Gaussian histogram mechanism, ``vote_histogram`` + ``add_gaussian_noise``
  on a fixed public candidate set.
* ``iterations = T > 1``: a short PE loop, run end to end on simple embeddings. Per iteration t = 1..T, exactly as
  :class:`pejax.runner.PrivateEvolution` does with one class, ``lookahead_degree = 0`` and
  ``variation_folds = 1``: vote histogram of the private set over the current candidates S_{t-1}, Gaussian noise,
  ``threshold`` at ``threshold_sigmas * sigma``, ``select_parents`` (``mode="sample"``), then a tiny generator
  (the candidates *are* the embeddings; a variation adds ``variation_degree * N(0, I)``) makes S_t from the
  parents. The adversary sees every candidate set S_0..S_{T-1} and every noisy histogram. By adaptive
  composition this transcript is covered by the claimed guarantee ``SelfComposedDpEvent(GaussianDpEvent(sigma),
  T)``; the released synthetic set is post-processing of it. The runner itself (generator protocol, checkpoints,
  ledger) is not vmappable, so the loop is re-assembled here from pejax's own kernels.

The canary is one private sample (sample level) or one user with ``group_size`` identical samples (user level),
placed outside the cloud of ordinary samples. The adversary knows D, the canary and the claimed mechanism
(a worst-case audit), so it can compute, for each iteration, the histogram of D over the candidates it sees,
H_t, and the canary's claimed vote vector v_t (norm 1). Scores (higher = "canary in"):

* ``"llr"``: ``sum_t <noisy_t - H_t, v_t>``, the log-likelihood-ratio test of the claimed Gaussian mechanism
  (up to an affine map). For a correct mechanism it separates in from out by exactly ``mu = sqrt(T) / sigma``, the
  Gaussian-DP parameter the accountant composes (also under adaptive candidates, since ``||v_t|| = 1``): it is the
  most powerful test against the claim, and only the number of runs limits the bound.
* ``"difference"``: ``sum_t <r_t - mean_s r_s, v_t - mean_s v_s>`` with r_t = noisy_t - H_t. Differences between
  iterations cancel noise that is (wrongly) shared between releases. Only used when T > 1.

Several scores are combined by a union bound: each is audited at significance ``(1 - confidence) / num_scores``
and the largest bound is reported.

The bound is :meth:`jax_privacy.auditing.CanaryScoreAuditor.epsilon_clopper_pearson` (Jagielski et al. 2020),
with jax-privacy's default Bonferroni correction over all thresholds: at each threshold, one-sided
Clopper-Pearson bounds give a lower bound on the true positive rate and an upper bound on the false positive
rate, and ``epsilon >= ln((TPR_low - delta) / FPR_high)`` for any (epsilon, delta)-DP mechanism. It assumes nothing
about the shape of the trade-off curve, so it is valid for every mechanism, broken or not; the price is power: with
R runs per side it cannot exceed about ``ln(R / ln(2 * num_thresholds / significance))`` (about 5.9 for R = 2000,
two scores, 95% confidence, even for runs that separate perfectly),
and for a correct Gaussian mechanism it stays well below the claim. jax-privacy's ``epsilon_from_gdp`` (Nasr et al.
2023) would be tighter, but in jax-privacy 2.0.0 it takes the absolute value of a statistic built from *upper*
confidence bounds, which is not a bound in the reversed direction: on two identical score distributions (no
leakage at all) it returns epsilon of about 6 at delta = 1e-5. It is therefore not used.

A lower bound is evidence, not proof: a bound below the claim does not show the mechanism is private (the test
may be weak, or the canary badly placed), while a bound above it refutes the claim at the stated confidence.

The broken mechanisms in :data:`broken_mechanisms` exist to validate the audit: each has a deliberate privacy
bug that the audit must detect.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pejax import _validate
from pejax import accounting
from pejax.mechanism import add_gaussian_noise
from pejax.mechanism import select_parents
from pejax.mechanism import threshold
from pejax.votes import vote_histogram

SCORES = ("llr", "difference")
"""Distinguishing tests (see the module docstring)."""

MIN_RUNS = 100
"""Smallest number of runs per neighbouring data set that :func:`audit_mechanism` accepts."""


# ------------------------------------------------------------------------------------------ mechanisms
class HistogramMechanism(Protocol):
    """A noisy vote-histogram release, the unit under audit.

    Called as ``mechanism(key, private, synthetic, *, iteration, noise_multiplier, k, group_ids)`` with

    * ``key``: the run's noise key; the mechanism derives the key of iteration ``iteration`` from it.
    * ``private``: (n, d) float32 private embeddings; ``synthetic``: (m, d) float32 candidate embeddings.
    * ``iteration``: int32 scalar (possibly traced) t >= 1.
    * ``noise_multiplier``: Python float sigma; ``k``: Python int.
    * ``group_ids``: ``None`` (sample level) or a concrete (n,) integer NumPy array of user ids.

    It returns the (m,) float32 noisy histogram. It must be traceable (it runs under ``jit`` and ``vmap``).
    """

    def __call__(
        self,
        key: jax.Array,
        private: jax.Array,
        synthetic: jax.Array,
        *,
        iteration: jax.Array | int,
        noise_multiplier: float,
        k: int,
        group_ids: np.ndarray | None,
    ) -> jax.Array: ...


def correct_mechanism(
    key: jax.Array,
    private: jax.Array,
    synthetic: jax.Array,
    *,
    iteration: jax.Array | int,
    noise_multiplier: float,
    k: int,
    group_ids: np.ndarray | None = None,
) -> jax.Array:
    """pejax's mechanism: :func:`pejax.vote_histogram` + :func:`pejax.add_gaussian_noise`, fresh noise each iteration.

    Args:
      key: the run's noise key; iteration t uses ``fold_in(key, t)``.
      private: (n, d) float private embeddings.
      synthetic: (m, d) float candidate embeddings, m >= k.
      iteration: t >= 1 (int or traced int32 scalar).
      noise_multiplier: sigma; noise standard deviation is ``sigma * 1`` (the histogram's sensitivity).
      k: neighbours per private sample.
      group_ids: ``None`` or (n,) integer user ids (user level: each user's vote vector has norm 1).

    Returns:
      (m,) float32 noisy histogram.

    Example:
      >>> import jax.numpy as jnp
      >>> private, synthetic = jnp.zeros((5, 2)), jnp.ones((3, 2))
      >>> correct_mechanism(jax.random.key(0), private, synthetic, iteration=1, noise_multiplier=2.0, k=1).shape
      (3,)
    """
    hist = vote_histogram(private, synthetic, k=k, group_ids=group_ids)
    return add_gaussian_noise(
        jax.random.fold_in(key, iteration), hist, noise_multiplier=noise_multiplier
    )


def broken_sensitivity_mechanism(
    key: jax.Array,
    private: jax.Array,
    synthetic: jax.Array,
    *,
    iteration: jax.Array | int,
    noise_multiplier: float,
    k: int,
    group_ids: np.ndarray | None = None,
) -> jax.Array:
    """DELIBERATELY BROKEN (audit fixture): noise scaled for sensitivity ``1/sqrt(k)`` instead of 1.

    The bug mistakes one vote's weight for the sensitivity. The noise is ``sqrt(k)`` times too small, so the
    release leaks like ``mu = sqrt(k) / sigma`` per iteration instead of ``1 / sigma``. Arguments and return value
    as :func:`correct_mechanism`.
    """
    hist = vote_histogram(private, synthetic, k=k, group_ids=group_ids)
    return add_gaussian_noise(
        jax.random.fold_in(key, iteration),
        hist,
        noise_multiplier=noise_multiplier,
        sensitivity=1.0 / math.sqrt(k),
    )


def broken_no_group_norm_mechanism(
    key: jax.Array,
    private: jax.Array,
    synthetic: jax.Array,
    *,
    iteration: jax.Array | int,
    noise_multiplier: float,
    k: int,
    group_ids: np.ndarray | None = None,
) -> jax.Array:
    """DELIBERATELY BROKEN (audit fixture): user-level votes without the per-user normalisation.

    ``group_ids`` are ignored, so a user with g samples that vote alike moves the histogram by a vector of norm up
    to g, while the noise is calibrated for norm 1. Identical to :func:`correct_mechanism` at sample level.
    Arguments and return value as :func:`correct_mechanism`.
    """
    del group_ids
    hist = vote_histogram(private, synthetic, k=k)
    return add_gaussian_noise(
        jax.random.fold_in(key, iteration), hist, noise_multiplier=noise_multiplier
    )


def broken_reused_noise_mechanism(
    key: jax.Array,
    private: jax.Array,
    synthetic: jax.Array,
    *,
    iteration: jax.Array | int,
    noise_multiplier: float,
    k: int,
    group_ids: np.ndarray | None = None,
) -> jax.Array:
    """DELIBERATELY BROKEN (audit fixture): the same noise in every iteration (the key is not folded with t).

    One release is fine, but differences between iterations cancel the noise exactly: when the candidates (and
    so the canary's bins) change between iterations, the canary is revealed without any noise. Arguments and
    return value as :func:`correct_mechanism`.
    """
    del iteration
    hist = vote_histogram(private, synthetic, k=k, group_ids=group_ids)
    return add_gaussian_noise(key, hist, noise_multiplier=noise_multiplier)


broken_mechanisms: Mapping[str, HistogramMechanism] = types.MappingProxyType(
    {
        "sensitivity": broken_sensitivity_mechanism,
        "no_group_norm": broken_no_group_norm_mechanism,
        "reused_noise": broken_reused_noise_mechanism,
    }
)
"""Deliberately broken mechanisms used to validate the audit (read-only): name -> mechanism."""

MECHANISMS: Mapping[str, HistogramMechanism] = types.MappingProxyType(
    {"correct": correct_mechanism, **broken_mechanisms}
)
"""Every named mechanism :func:`audit_mechanism` accepts as a string (read-only)."""


# ------------------------------------------------------------------------------------------- the setup
def _float_matrix(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D array (num_samples, dim), got shape {arr.shape}."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{name} must have a floating dtype, got {arr.dtype}; convert it with .astype(np.float32)."
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf; audit data must be finite.")
    return arr.astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AuditSetup:
    """The neighbouring data sets and the public starting candidates of an audit.

    D is ``private`` (with ``group_ids`` at user level); D' is D plus the ``canary`` rows (one more user at user
    level). Build one with :func:`make_audit_setup` or by hand.

    Attributes:
      private: (n, d) float32 embeddings of D.
      canary: (c, d) float32 canary embeddings: c = 1 at sample level; at user level the c samples of one user.
      synthetic: (m, d) float32 public candidates S_0.
      group_ids: ``None`` (sample level) or (n,) int user ids of D (user level).

    Raises:
      ValueError, TypeError: shapes, dtypes or values that do not fit (the message names the field).
    """

    private: np.ndarray
    canary: np.ndarray
    synthetic: np.ndarray
    group_ids: np.ndarray | None = None

    def __post_init__(self):
        private = _float_matrix("private", self.private)
        canary = _float_matrix("canary", self.canary)
        synthetic = _float_matrix("synthetic", self.synthetic)
        d = private.shape[1]
        if canary.shape[1] != d or synthetic.shape[1] != d:
            raise ValueError(
                f"private, canary and synthetic must share the embedding dimension, got shapes "
                f"{private.shape}, {canary.shape} and {synthetic.shape}."
            )
        groups = None
        if self.group_ids is not None:
            ids = np.asarray(self.group_ids)
            if ids.shape != (private.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(
                    f"group_ids must be integers of shape ({private.shape[0]},) (one user id per row of "
                    f"private), got {ids.dtype} {ids.shape}."
                )
            groups = np.unique(ids, return_inverse=True)[1].astype(np.int32)
        elif canary.shape[0] != 1:
            raise ValueError(
                f"at sample level (group_ids=None) the canary is one sample, got {canary.shape[0]} rows. "
                "Pass group_ids for a user-level audit with a canary user of several samples."
            )
        for name, value in (
            ("private", private),
            ("canary", canary),
            ("synthetic", synthetic),
            ("group_ids", groups),
        ):
            object.__setattr__(self, name, value)

    @property
    def user_level(self) -> bool:
        """Whether neighbouring data sets differ by one user (``group_ids`` given) rather than one sample."""
        return self.group_ids is not None

    def with_canary(self) -> tuple[np.ndarray, np.ndarray | None]:
        """D' as ``(private, group_ids)``: D's rows then the canary's (a new user at user level)."""
        private = np.concatenate([self.private, self.canary])
        if self.group_ids is None:
            return private, None
        canary_user = np.full(self.canary.shape[0], self.group_ids.max() + 1, np.int32)
        return private, np.concatenate([self.group_ids, canary_user])


def make_audit_setup(
    key: jax.Array,
    *,
    num_private: int = 64,
    num_synthetic: int = 64,
    dim: int = 2,
    group_size: int | None = None,
) -> AuditSetup:
    """A simple audit setup: D and S_0 uniform in [0, 1]^dim, the canary at (1.5, ..., 1.5), outside both.

    Args:
      key: ``jax.random`` key (required; the setup is a function of it).
      num_private: n, samples in D.
      num_synthetic: m, public starting candidates (the number of histogram bins).
      dim: embedding dimension.
      group_size: ``None`` for a sample-level audit (the canary is one sample); an int g >= 1 for a user-level
        audit: D's samples belong to users of g samples each (``arange(n) // g``) and the canary is one user with
        g identical samples, so they vote alike (the worst case for a missing group normalisation).

    Returns:
      an :class:`AuditSetup`.

    Example:
      >>> import jax
      >>> s = make_audit_setup(jax.random.key(0), num_private=10, num_synthetic=8, group_size=2)
      >>> s.private.shape, s.canary.shape, s.synthetic.shape, s.user_level
      ((10, 2), (2, 2), (8, 2), True)
    """
    _validate.check_key(key)
    n = _validate.positive_int("num_private", num_private)
    m = _validate.positive_int("num_synthetic", num_synthetic)
    d = _validate.positive_int("dim", dim)
    k_priv, k_syn = jax.random.split(key)
    private = np.asarray(jax.random.uniform(k_priv, (n, d), jnp.float32))
    synthetic = np.asarray(jax.random.uniform(k_syn, (m, d), jnp.float32))
    if group_size is None:
        return AuditSetup(
            private=private, canary=np.full((1, d), 1.5, np.float32), synthetic=synthetic
        )
    g = _validate.positive_int("group_size", group_size)
    return AuditSetup(
        private=private,
        canary=np.full((g, d), 1.5, np.float32),
        synthetic=synthetic,
        group_ids=np.arange(n, dtype=np.int32) // g,
    )


# ---------------------------------------------------------------------------------------- the PE loop
class Transcript(NamedTuple):
    """What an adversary sees of one audited run.

    Attributes:
      candidates: (T, m, d) float32, the candidate set S_{t-1} each histogram was computed over.
      noisy: (T, m) float32 noisy histograms.
    """

    candidates: jax.Array
    noisy: jax.Array


class _LoopSettings(NamedTuple):
    """Static (hashable) settings of the audited loop; cached compilations are keyed by them."""

    mechanism: Any
    iterations: int
    noise_multiplier: float
    k: int
    threshold_sigmas: float
    variation_degree: float


def _groups(ids: tuple[int, ...] | None) -> np.ndarray | None:
    """Static (tuple) user ids back to the concrete array :func:`pejax.vote_histogram` needs."""
    return None if ids is None else np.asarray(ids, np.int32)


def _transcript(key, private, synthetic0, group_ids, s: _LoopSettings) -> Transcript:
    """One run of the audited loop (traceable; ``private`` and ``synthetic0`` must be traced under jit,
    because pejax's eager input checks are skipped only for traced values)."""
    noise_key, loop_key = jax.random.split(key)
    m = synthetic0.shape[0]

    def step(synthetic, t):
        noisy = s.mechanism(
            noise_key,
            private,
            synthetic,
            iteration=t,
            noise_multiplier=s.noise_multiplier,
            k=s.k,
            group_ids=group_ids,
        )
        kept = threshold(noisy, threshold=s.threshold_sigmas * s.noise_multiplier)
        k_sel, k_var = jax.random.split(jax.random.fold_in(loop_key, t))
        parents = synthetic[select_parents(k_sel, kept, num_samples=m, mode="sample").indices]
        children = parents + s.variation_degree * jax.random.normal(k_var, parents.shape)
        return children, (synthetic, noisy.astype(jnp.float32))

    steps = jnp.arange(1, s.iterations + 1, dtype=jnp.int32)
    _, (candidates, noisy) = lax.scan(step, synthetic0, steps)
    return Transcript(candidates, noisy)


def _scores(transcript, adversary_private, adversary_groups, canary, canary_groups, k):
    """Scores of one transcript: (llr, difference), float32 scalars."""

    def residual_and_votes(candidates, noisy):
        h = vote_histogram(adversary_private, candidates, k=k, group_ids=adversary_groups)
        v = vote_histogram(canary, candidates, k=k, group_ids=canary_groups)
        return noisy - h, v

    r, v = jax.vmap(residual_and_votes)(transcript.candidates, transcript.noisy)
    llr = jnp.sum(r * v)
    difference = jnp.sum((r - r.mean(axis=0)) * (v - v.mean(axis=0)))
    return llr, difference


@functools.partial(jax.jit, static_argnames=("settings", "run_groups"))
def _transcript_jit(key, private, synthetic0, *, settings, run_groups):
    return _transcript(key, private, synthetic0, _groups(run_groups), settings)


@functools.partial(
    jax.jit, static_argnames=("settings", "groups_in", "groups_out", "adv_groups", "can_groups")
)
def _batched_scores(
    keys_in,
    keys_out,
    private_in,
    private_out,
    synthetic0,
    adv_private,
    canary,
    *,
    settings,
    groups_in,
    groups_out,
    adv_groups,
    can_groups,
):
    """Scores of ``len(keys_in)`` runs on D' and ``len(keys_out)`` runs on D, in one compiled program."""

    def batch(keys, private, run_groups):
        def one(key):
            tr = _transcript(key, private, synthetic0, _groups(run_groups), settings)
            return _scores(
                tr, adv_private, _groups(adv_groups), canary, _groups(can_groups), settings.k
            )

        return jax.vmap(one)(keys)

    return batch(keys_in, private_in, groups_in), batch(keys_out, private_out, groups_out)


def release_transcript(
    key: jax.Array,
    setup: AuditSetup,
    *,
    include_canary: bool,
    noise_multiplier: float,
    iterations: int = 1,
    k: int = 1,
    mechanism: str | HistogramMechanism = "correct",
    threshold_sigmas: float = 1.0,
    variation_degree: float = 0.05,
) -> Transcript:
    """Runs the audited loop once and returns what the adversary sees (see the module docstring).

    Args:
      key: ``jax.random`` key of the run (noise, selection and variation all derive from it).
      setup: the data sets and S_0.
      include_canary: run on D' (True) or D (False).
      noise_multiplier: sigma > 0.
      iterations: T >= 1.
      k: neighbours per private sample, 1 <= k <= m.
      mechanism: a name in :data:`MECHANISMS` or a :class:`HistogramMechanism`.
      threshold_sigmas: bins below ``threshold_sigmas * sigma`` are dropped before selection.
      variation_degree: standard deviation of the toy generator's variation (embedding units).

    Returns:
      a :class:`Transcript` with (T, m, d) candidates and (T, m) noisy histograms.
    """
    settings = _settings(
        mechanism, noise_multiplier, iterations, k, threshold_sigmas, variation_degree, setup
    )
    _validate.check_key(key)
    private, groups = setup.with_canary() if include_canary else (setup.private, setup.group_ids)
    return _transcript_jit(
        key,
        jnp.asarray(private),
        jnp.asarray(setup.synthetic),
        settings=settings,
        run_groups=_as_tuple(groups),
    )


# ------------------------------------------------------------------------------------------ the bound
def epsilon_lower_bound(
    in_scores: Any,
    out_scores: Any,
    *,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Empirical epsilon lower bound from canary scores, by jax-privacy's ``CanaryScoreAuditor``.

    Args:
      in_scores: (R_in,) float scores of runs with the canary (higher means "canary in").
      out_scores: (R_out,) float scores of runs without it.
      delta: the delta at which epsilon is bounded, in (0, 1).
      confidence: probability, over the runs, that the bound is valid, in (0.5, 1).

    Returns:
      epsilon lower bound >= 0 (Python float).

    Raises:
      ValueError: for scores that are not non-empty 1-D finite arrays, or parameters out of range.
      ImportError: when jax-privacy is not installed.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> out = rng.normal(size=2000)
      >>> lb = epsilon_lower_bound(out + 1.0, rng.normal(size=2000), delta=1e-5)
      >>> 1.0 < lb < 4.38  # the Gaussian mechanism with mu = 1 has epsilon 4.38 at delta = 1e-5
      True
    """
    delta = _validate.delta(delta)
    confidence = _confidence(confidence)
    in_s = _scores_array("in_scores", in_scores)
    out_s = _scores_array("out_scores", out_scores)
    auditor = _auditing().CanaryScoreAuditor(in_s, out_s)
    # One-sided (high scores mean "in"), Bonferroni over thresholds: jax-privacy's defaults.
    return float(auditor.epsilon_clopper_pearson(1.0 - confidence, delta))


def _auditing():
    try:
        from jax_privacy import (
            auditing,
        )  # heavy import (optax, chex): only when a bound is computed
    except ImportError as e:  # pragma: no cover - jax-privacy is installed in the test environment
        raise ImportError(
            "pejax's privacy audit turns canary scores into epsilon lower bounds with jax-privacy's "
            "auditing module; install it with `pip install 'jax-privacy>=2'`."
        ) from e
    return auditing


# ----------------------------------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditReport:
    """Outcome of :func:`audit_mechanism`.

    Attributes:
      epsilon_lower_bound: the empirical lower bound (max over ``score_bounds``), valid with probability
        ``confidence`` over the runs.
      confidence: confidence of the bound.
      delta: delta of the bound and of the claimed epsilons.
      runs: runs per neighbouring data set (``runs`` with the canary and ``runs`` without).
      claimed_epsilon: epsilon claimed by pejax's accounting under each accountant (``pld``, ``rdp``,
        ``gaussian``) for ``iterations`` releases with ``noise_multiplier``.
      accountant: the accountant whose claim the verdict tests.
      passed: ``epsilon_lower_bound <= claimed_epsilon[accountant]`` (no violation detected).
      score_bounds: the bound of each score, each at significance ``(1 - confidence) / len(score_bounds)``.
      mechanism: name of the audited mechanism.
      noise_multiplier: sigma.
      iterations: T, releases per run.
      k: neighbours per private sample.
      user_level: whether the canary is one user (group) rather than one sample.
      audited: a one-line statement of what was audited.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    runs: int
    claimed_epsilon: dict[str, float]
    accountant: str
    passed: bool
    score_bounds: dict[str, float]
    mechanism: str
    noise_multiplier: float
    iterations: int
    k: int
    user_level: bool
    audited: str

    @property
    def verdict(self) -> str:
        """``"pass"`` when no violation was detected, ``"violation"`` otherwise."""
        return "pass" if self.passed else "violation"

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable values (with ``verdict``)."""
        out = dataclasses.asdict(self)
        out["verdict"] = self.verdict
        return out

    def summary(self) -> str:
        """A few human-readable lines: the lower bound beside every accountant's claimed epsilon."""
        level = "user level" if self.user_level else "sample level"
        claimed = self.claimed_epsilon[self.accountant]
        lines = [
            f"audited: {self.audited}",
            f"mechanism: {self.mechanism} ({level}, T={self.iterations}, k={self.k}, "
            f"noise multiplier {self.noise_multiplier:.6g}, delta {self.delta:g})",
            f"runs: {self.runs} with the canary + {self.runs} without; Clopper-Pearson bound, "
            f"{self.confidence:.0%} confidence",
            f"empirical epsilon lower bound: {self.epsilon_lower_bound:.4f}  "
            + "  ".join(f"[{name}: {value:.4f}]" for name, value in self.score_bounds.items()),
        ]
        lines += [
            f"claimed epsilon ({name}): {value:.4f}"
            + ("  <- tested" if name == self.accountant else "")
            for name, value in self.claimed_epsilon.items()
        ]
        if self.passed:
            lines.append(
                f"verdict: pass (lower bound {self.epsilon_lower_bound:.4f} <= claimed {claimed:.4f})"
            )
        else:
            lines.append(
                f"verdict: VIOLATION (lower bound {self.epsilon_lower_bound:.4f} > claimed {claimed:.4f} "
                f"at {self.confidence:.0%} confidence)"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the audit
def audit_mechanism(
    key: jax.Array,
    setup: AuditSetup,
    *,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    iterations: int = 1,
    k: int = 1,
    delta: float = 1e-5,
    runs: int = 2000,
    confidence: float = 0.95,
    mechanism: str | HistogramMechanism = "correct",
    accountant: str = accounting.DEFAULT_ACCOUNTANT,
    scores: Sequence[str] | None = None,
    threshold_sigmas: float = 1.0,
    variation_degree: float = 0.05,
) -> AuditReport:
    """Audits a mechanism (``iterations=1``) or a short PE loop (``iterations=T``) with a canary.

    Runs the loop ``runs`` times on D' (with the canary) and ``runs`` times on D (without), all runs in one
    ``jit(vmap(...))`` over independent keys, scores each transcript and bounds epsilon with jax-privacy's
    ``CanaryScoreAuditor.epsilon_clopper_pearson`` (see the module docstring).

    Args:
      key: ``jax.random`` key (required); runs with and without the canary use independent keys derived from it.
      setup: the neighbouring data sets and S_0 (:func:`make_audit_setup`).
      epsilon: the claimed epsilon to audit; the noise is calibrated to it with ``accountant``. Give exactly one
        of ``epsilon`` and ``noise_multiplier``.
      noise_multiplier: sigma > 0, the noise the mechanism is told to add.
      iterations: T >= 1 noisy releases per run (T > 1: selection and variation in between).
      k: neighbours per private sample, 1 <= k <= m.
      delta: delta in (0, 1) of the bound and of the claims.
      runs: runs per neighbouring data set, >= :data:`MIN_RUNS` (power grows with runs; cost is linear).
      confidence: probability that the bound is valid, in (0.5, 1).
      mechanism: ``"correct"``, a name in :data:`broken_mechanisms`, or any :class:`HistogramMechanism`.
      accountant: whose claimed epsilon the verdict tests (all are reported).
      scores: names in :data:`SCORES` (default ``("llr",)`` for T = 1, ``("llr", "difference")`` otherwise).
      threshold_sigmas, variation_degree: the loop's threshold (in units of sigma) and the toy generator's step.

    Returns:
      an :class:`AuditReport`.

    Raises:
      ValueError, TypeError: for invalid arguments (the message names the argument and the fix).

    Example:
      >>> import jax
      >>> setup = make_audit_setup(jax.random.key(1))
      >>> report = audit_mechanism(jax.random.key(2), setup, noise_multiplier=3.0, k=16, runs=2000)
      >>> report.passed, round(report.claimed_epsilon["pld"], 3), report.epsilon_lower_bound < 0.5
      (True, 1.271, True)
    """
    _validate.check_key(key)
    if not isinstance(setup, AuditSetup):
        raise TypeError(
            f"setup must be a pejax.auditing.AuditSetup (see make_audit_setup), got {type(setup).__name__}."
        )
    if (epsilon is None) == (noise_multiplier is None):
        raise ValueError(
            f"give exactly one of epsilon (a claim to calibrate the noise to) and noise_multiplier, got "
            f"epsilon={epsilon!r} and noise_multiplier={noise_multiplier!r}."
        )
    iterations = _validate.positive_int("iterations", iterations)
    delta = _validate.delta(delta)
    confidence = _confidence(confidence)
    runs = _validate.positive_int("runs", runs)
    if runs < MIN_RUNS:
        raise ValueError(
            f"runs must be >= {MIN_RUNS} per neighbouring data set, got {runs}; with fewer runs the "
            "confidence intervals are too wide to bound anything. Use runs=2000 or more for a tight audit."
        )
    _validate.one_of("accountant", accountant, accounting.ACCOUNTANTS)
    if epsilon is not None:
        epsilon = _validate.epsilon(epsilon)
        noise_multiplier = accounting.noise_multiplier(
            epsilon=epsilon, iterations=iterations, delta=delta, accountant=accountant
        )
    noise_multiplier = _validate.finite_float(
        "noise_multiplier", noise_multiplier, minimum=0.0, strict=True
    )
    if scores is None:
        scores = ("llr",) if iterations == 1 else SCORES
    if isinstance(scores, str) or not scores:
        raise ValueError(
            f"scores must be a non-empty sequence of names in {SCORES}, got {scores!r}."
        )
    scores = tuple(scores)
    for name in scores:
        _validate.one_of("scores", name, SCORES)
    settings = _settings(
        mechanism, noise_multiplier, iterations, k, threshold_sigmas, variation_degree, setup
    )
    name = mechanism if isinstance(mechanism, str) else getattr(mechanism, "__name__", "custom")

    key_in, key_out = jax.random.split(key)
    priv_in, groups_in = setup.with_canary()
    canary_groups = None if setup.group_ids is None else np.zeros(len(setup.canary))
    scores_in, scores_out = _batched_scores(
        jax.random.split(key_in, runs),
        jax.random.split(key_out, runs),
        jnp.asarray(priv_in),
        jnp.asarray(setup.private),
        jnp.asarray(setup.synthetic),
        jnp.asarray(setup.private),
        jnp.asarray(setup.canary),
        settings=settings,
        groups_in=_as_tuple(groups_in),
        groups_out=_as_tuple(setup.group_ids),
        adv_groups=_as_tuple(setup.group_ids),
        can_groups=_as_tuple(canary_groups),
    )
    s_in = dict(zip(SCORES, map(np.asarray, scores_in), strict=True))
    s_out = dict(zip(SCORES, map(np.asarray, scores_out), strict=True))
    per_score = (1.0 - confidence) / len(scores)
    score_bounds = {
        s: epsilon_lower_bound(s_in[s], s_out[s], delta=delta, confidence=1.0 - per_score)
        for s in scores
    }
    bound = max(score_bounds.values())
    claimed = {
        acc: accounting.epsilon(
            noise_multiplier=noise_multiplier, iterations=iterations, delta=delta, accountant=acc
        )
        for acc in accounting.ACCOUNTANTS
    }
    level = "one user" if setup.user_level else "one sample"
    if iterations == 1:
        audited = (
            f"one release of the noisy vote histogram over {setup.synthetic.shape[0]} fixed candidates; "
            f"neighbours differ by {level}"
        )
    else:
        audited = (
            f"the {iterations} noisy histograms and candidate sets of a PE loop (threshold, sample "
            f"selection, Gaussian variation of {setup.synthetic.shape[0]} candidates); neighbours differ "
            f"by {level}"
        )
    return AuditReport(
        epsilon_lower_bound=bound,
        confidence=confidence,
        delta=delta,
        runs=runs,
        claimed_epsilon=claimed,
        accountant=accountant,
        passed=bool(bound <= claimed[accountant]),
        score_bounds=score_bounds,
        mechanism=name,
        noise_multiplier=noise_multiplier,
        iterations=iterations,
        k=settings.k,
        user_level=setup.user_level,
        audited=audited,
    )


# -------------------------------------------------------------------------------------------- helpers


def _confidence(value: Any) -> float:
    c = _validate.finite_float("confidence", value)
    if not 0.5 < c < 1.0:
        raise ValueError(
            f"confidence must lie strictly between 0.5 and 1, got {c}. Use e.g. confidence=0.95 (a bound that "
            "fails with probability 5%)."
        )
    return c


def _scores_array(name: str, scores: Any) -> np.ndarray:
    arr = np.asarray(scores, np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf; scores must be finite.")
    return arr


def _as_tuple(groups) -> tuple[int, ...] | None:
    return None if groups is None else tuple(int(g) for g in np.asarray(groups))


def _settings(
    mechanism, noise_multiplier, iterations, k, threshold_sigmas, variation_degree, setup
):
    if isinstance(mechanism, str):
        _validate.one_of("mechanism", mechanism, tuple(MECHANISMS))
        mechanism = MECHANISMS[mechanism]
    elif not callable(mechanism):
        raise TypeError(
            f"mechanism must be a name in {tuple(MECHANISMS)} or a HistogramMechanism function, got "
            f"{mechanism!r}."
        )
    if not isinstance(setup, AuditSetup):
        raise TypeError(
            f"setup must be a pejax.auditing.AuditSetup (see make_audit_setup), got {type(setup).__name__}."
        )
    k = _validate.positive_int("k", k)
    m = setup.synthetic.shape[0]
    if k > m:
        raise ValueError(
            f"k={k} exceeds the number of candidates ({m}); use k <= {m} or a setup with more candidates."
        )
    return _LoopSettings(
        mechanism=mechanism,
        iterations=_validate.positive_int("iterations", iterations),
        noise_multiplier=_validate.finite_float(
            "noise_multiplier", noise_multiplier, minimum=0.0, strict=True
        ),
        k=k,
        threshold_sigmas=_validate.finite_float("threshold_sigmas", threshold_sigmas),
        variation_degree=_validate.finite_float("variation_degree", variation_degree, minimum=0.0),
    )


__all__ = [
    "MECHANISMS",
    "MIN_RUNS",
    "SCORES",
    "AuditReport",
    "AuditSetup",
    "HistogramMechanism",
    "Transcript",
    "audit_mechanism",
    "broken_mechanisms",
    "broken_no_group_norm_mechanism",
    "broken_reused_noise_mechanism",
    "broken_sensitivity_mechanism",
    "correct_mechanism",
    "epsilon_lower_bound",
    "make_audit_setup",
    "release_transcript",
]
