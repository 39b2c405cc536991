"""Black-box audit of the shipped run: :meth:`pejax.PrivateEvolution.run` itself, on neighbouring data sets.

:mod:`pejax.auditing` audits the vote-histogram kernels in a re-assembled loop (fast, vmapped). This module audits
the product: it calls the public ``PrivateEvolution.run`` (the code path of ``pejax run`` and ``pejax demo``) many
times on D (without) and D' = D + canary (with), every run with a fresh public key and a fresh secret noise key,
and an adversary who sees everything a run releases to a callback or a report: every candidate set, every noisy
histogram (the discrete Gaussian mechanism's outputs), the noisy class counts, the synthetic set and the public
seed. A wiring bug anywhere between the private data and those outputs (key derivation, class masks, the noise
itself) is therefore in scope. Three checks:

1. **Statistical**: each run is scored by several distinguishing tests (higher = "canary in"), and the scores of
   the two sides become an epsilon lower bound by jax-privacy's ``CanaryScoreAuditor`` (Clopper-Pearson, through
   :func:`pejax.auditing.epsilon_lower_bound`), one bound per score with a union bound over scores:

   * ``llr``: sum over iterations of ``<noisy - H_D, v>`` in the canary's class (H_D: D's histogram over the
     candidates the run showed; v: the canary's vote vector). The most powerful test of the claimed mechanism.
   * ``llr_all_classes``: the same summed over every class, as if the canary voted in each (catches votes that
     leak across the class partition).
   * ``difference_iterations``: residuals centred over iterations (catches noise reused across iterations).
   * ``difference_classes``: the canary class's residual minus another class's (catches noise shared by classes).
   * ``seed_replay``: the residual after subtracting the noise that ``NoiseKey.from_seed(public seed)`` would draw
     (catches noise derived from public information).

2. **Sensitivity**: pairs of runs on D and D' with the *same* public and noise keys (an auditor's privilege: the
   noise key is an argument of ``run``). Wherever both runs voted over identical candidates, the change of the
   noisy histograms is the change of the votes: its L2 norm over all classes must not exceed the claimed
   sensitivity (1 under add/remove).

3. **Lattice**: every released noisy value must be a lattice point (an integer number of ``1/sqrt(k)`` votes,
   integer class counts): otherwise its floating-point support can leak (Mironov 2012).

The runs use a tiny simulator (points in the unit square, the embedding is the identity) so that one run takes
milliseconds beyond the run's own bookkeeping. :data:`PLANTED_BUGS` are copies of ``PrivateEvolution`` with one
deliberate privacy bug each in the shipped code path; the tests check that the audit catches every one.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _validate
from pejax import engine
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.mechanism import add_gaussian_noise
from pejax.runner import PrivateEvolution
from pejax.secure_noise import NoiseKey
from pejax.secure_noise import discrete_gaussian_noise

SCORES = ("llr", "llr_all_classes", "difference_iterations", "difference_classes", "seed_replay")


# ------------------------------------------------------------------------------------------- the setup
class PointGenerator:
    """A simulator whose samples are points in [0, 1]^d, rendered as (1, d, 1) images.

    ``random`` draws uniform points (from the public key); ``variation`` adds ``0.3 * degree`` Gaussian noise and
    clips. It never sees private data.
    """

    name = "audit-points"
    modality = "image"

    def __init__(self, dim: int = 2):
        self.dim = _validate.positive_int("dim", dim)

    def random(self, key, label, num_samples):
        return jax.random.uniform(jax.random.fold_in(key, label), (num_samples, self.dim))

    def variation(self, key, samples, label, degree):
        noise = jax.random.normal(key, jnp.shape(samples))
        return jnp.clip(samples + 0.3 * degree * noise, 0.0, 1.0)

    def to_images(self, samples):
        return jnp.reshape(samples, (-1, 1, self.dim, 1))


def _identity(images):
    return jnp.reshape(images, (images.shape[0], -1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunAuditSetup:
    """Neighbouring data sets for the run audit.

    Attributes:
      private: (n, 1, d, 1) float32 private points of D, in [0, 1].
      labels: (n,) int32 labels of D.
      canary: (1, d, 1) float32 point added to D to make D' (label ``canary_label``).
      canary_label: its class.
      num_classes: C.
    """

    private: np.ndarray
    labels: np.ndarray
    canary: np.ndarray
    canary_label: int
    num_classes: int

    def data(self, include_canary: bool) -> tuple[np.ndarray, np.ndarray]:
        if not include_canary:
            return self.private, self.labels
        return (
            np.concatenate([self.private, self.canary[None]]),
            np.concatenate([self.labels, [self.canary_label]]).astype(np.int32),
        )

    def points(self, label: int) -> np.ndarray:
        """(n_y, d) float64 points of D in class ``label`` (what the adversary knows)."""
        return (
            self.private[self.labels == label].reshape(-1, self.private.shape[2]).astype(np.float64)
        )


def make_run_audit_setup(
    *, num_classes: int = 2, per_class: int = 16, dim: int = 2, seed: int = 0
) -> RunAuditSetup:
    """Class y's points cluster around (0.3 + 0.4 y / C, 0.5, ...); the canary sits in the corner (1, 1, ...)."""
    c = _validate.positive_int("num_classes", num_classes, minimum=2)
    per = _validate.positive_int("per_class", per_class, minimum=2)
    d = _validate.positive_int("dim", dim)
    rng = np.random.default_rng(seed)
    pts, labels = [], []
    for y in range(c):
        centre = np.full(d, 0.5)
        centre[0] = 0.3 + 0.4 * y / c
        pts.append(np.clip(centre + 0.08 * rng.normal(size=(per, d)), 0, 0.9))
        labels.append(np.full(per, y))
    private = np.concatenate(pts).astype(np.float32).reshape(-1, 1, d, 1)
    canary = np.ones((1, d, 1), np.float32)
    return RunAuditSetup(
        private=private,
        labels=np.concatenate(labels).astype(np.int32),
        canary=canary,
        canary_label=0,
        num_classes=c,
    )


# ------------------------------------------------------------------------------------- planted bugs
class _RemappedKey:
    """A noise key whose per-release keys are remapped (the planted noise-sharing bugs)."""

    def __init__(self, key: NoiseKey, remap: Callable[[int, int], tuple[int, int]]):
        self.key, self.remap = key, remap

    def fold_in(self, t: int, label: int) -> NoiseKey:
        return self.key.fold_in(*self.remap(t, label))


class SharedNoiseAcrossClasses(PrivateEvolution):
    """Bug: every class of an iteration draws the same noise (class 1 reuses class 0's key)."""

    def _step(self, state, votes, noise_key, plan):
        return super()._step(state, votes, _RemappedKey(noise_key, lambda t, y: (t, 0)), plan)


class SharedNoiseAcrossIterations(PrivateEvolution):
    """Bug: every iteration of a class draws the same noise."""

    def _step(self, state, votes, noise_key, plan):
        return super()._step(state, votes, _RemappedKey(noise_key, lambda t, y: (1, y)), plan)


class NoiseBeforeClassMask(PrivateEvolution):
    """Bug: every class's histogram is voted by all private samples (the class mask comes too late)."""

    def _private_votes(self, images, labels, group_ids, private_stream):
        everyone = super()._private_votes(images, np.zeros_like(labels), group_ids, None)
        c = self.pe.num_classes
        return engine.PrivateVotes(
            [everyone.embeddings[0]] * c,
            [everyone.rows[0]] * c,
            [None] * c,
            pe=self.pe,
            speed=self.speed,
        )


def public_seed(key: jax.Array) -> int:
    """The integer an adversary reads off a run's public key (the last word of its key data)."""
    return int(np.asarray(jax.random.key_data(key)).ravel()[-1])


class PublicNoiseKey(PrivateEvolution):
    """Bug: the noise key is derived from the public seed (seed replay recovers the noise)."""

    def run(self, key, *args, **kwargs):
        kwargs["noise_key"] = NoiseKey.from_seed(public_seed(key))
        return super().run(key, *args, **kwargs)


class ContinuousNoise(PrivateEvolution):
    """Bug: float32 Gaussian noise on the real-valued histogram (leaks through its floating-point support)."""

    def _step(self, state, votes, noise_key, plan):
        return super()._step(state, votes, noise_key, plan, mechanism=_float_gaussian)


def _float_gaussian(noise_key, votes, *, noise_multiplier):
    hist = jnp.asarray(votes.counts * votes.scale, jnp.float32)
    key = jax.random.key(secrets.randbits(31))
    return np.asarray(add_gaussian_noise(key, hist, noise_multiplier=noise_multiplier), np.float64)


PLANTED_BUGS: dict[str, type[PrivateEvolution]] = {
    "shared_noise_across_classes": SharedNoiseAcrossClasses,
    "shared_noise_across_iterations": SharedNoiseAcrossIterations,
    "noise_before_class_mask": NoiseBeforeClassMask,
    "public_noise_key": PublicNoiseKey,
    "continuous_noise": ContinuousNoise,
}
"""Deliberately broken runners (name -> class) that :func:`audit_run` must catch."""


# -------------------------------------------------------------------------------------- transcripts
@dataclasses.dataclass
class _Transcript:
    """What one run releases: per iteration t >= 1 and class y, the candidates and the noisy histogram."""

    seed: int
    candidates: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)
    noisy: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)
    counts: list[float] = dataclasses.field(default_factory=list)


def _one_run(runner: PrivateEvolution, setup, include, key, noise_key=None) -> _Transcript:
    tr = _Transcript(seed=public_seed(key))

    def capture(info):
        if info.iteration == 0:
            tr.counts = list(info.stats.get("noisy_class_counts", []))
            return
        for y, (cand, noisy) in enumerate(zip(info.candidates, info.noisy_histograms, strict=True)):
            tr.candidates[info.iteration, y] = np.asarray(cand, np.float64)
            tr.noisy[info.iteration, y] = np.asarray(noisy, np.float64)

    runner.callbacks = (capture,)
    x, y = setup.data(include)
    runner.run(key, x, y, noise_key=noise_key)
    return tr


def _votes(points: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Float64 sample-level histogram (k = 1) of ``points`` over ``candidates`` (NumPy, independent of pejax)."""
    d = ((points[:, None, :] - candidates[None, :, :]) ** 2).sum(-1)
    return np.bincount(np.argmin(d, axis=1), minlength=candidates.shape[0]).astype(np.float64)


def _scores(tr: _Transcript, setup: RunAuditSetup, sigma: float, iterations: int) -> np.ndarray:
    c = setup.canary_label
    other = (c + 1) % setup.num_classes
    canary = setup.canary.reshape(1, -1).astype(np.float64)
    r, v = {}, {}
    for (t, y), cand in tr.candidates.items():
        r[t, y] = tr.noisy[t, y] - _votes(setup.points(y), cand)
        v[t, y] = _votes(canary, cand)
    ts = range(1, iterations + 1)
    llr = sum(float(r[t, c] @ v[t, c]) for t in ts)
    llr_all = sum(float(r[t, y] @ v[t, y]) for t in ts for y in range(setup.num_classes))
    rc = np.stack([r[t, c] for t in ts])
    vc = np.stack([v[t, c] for t in ts])
    diff_iter = float(((rc - rc.mean(0)) * (vc - vc.mean(0))).sum())
    same_size = all(r[t, c].shape == r[t, other].shape for t in ts)
    diff_class = sum(float((r[t, c] - r[t, other]) @ v[t, c]) for t in ts) if same_size else 0.0
    replay = NoiseKey.from_seed(tr.seed)
    replayed = 0.0
    for t in ts:
        z = discrete_gaussian_noise(replay.fold_in(t, c), sigma=sigma, size=r[t, c].shape[0])
        resid = r[t, c] - z
        # Exact recovery of the canary's votes (or of nothing) is the signature of replayable noise.
        replayed += -float(np.sum((resid - v[t, c]) ** 2)) + float(np.sum(resid**2))
    return np.array([llr, llr_all, diff_iter, diff_class, replayed])


def _off_lattice(tr: _Transcript, k: int) -> int:
    """Number of released values that are not integer multiples of the lattice step."""
    bad = 0
    for noisy in tr.noisy.values():
        steps = noisy * math.sqrt(k)
        bad += int(np.sum(np.abs(steps - np.rint(steps)) > 1e-9 * np.maximum(1.0, np.abs(steps))))
    counts = np.asarray(tr.counts, np.float64)
    bad += int(np.sum(counts != np.rint(counts)))
    return bad


def _pair_sensitivity(a: _Transcript, b: _Transcript, iterations: int, num_classes: int) -> float:
    """Largest L2 change of the noisy histograms (all classes of one iteration) where candidates agree."""
    worst = 0.0
    for t in range(1, iterations + 1):
        if all(np.array_equal(a.candidates[t, y], b.candidates[t, y]) for y in range(num_classes)):
            sq = sum(
                float(np.sum((a.noisy[t, y] - b.noisy[t, y]) ** 2)) for y in range(num_classes)
            )
            worst = max(worst, math.sqrt(sq))
    return worst


# ------------------------------------------------------------------------------------------ the audit
@dataclasses.dataclass(frozen=True, kw_only=True)
class RunAuditReport:
    """Outcome of :func:`audit_run`.

    Attributes:
      runner: name of the audited runner class (``PrivateEvolution`` or a planted bug).
      epsilon_lower_bound: max over ``score_bounds`` (valid with probability ``confidence``).
      score_bounds: bound of each score in :data:`SCORES`.
      claimed_epsilon: epsilon the run's own ledger reports (its accountant).
      delta, confidence, runs: as given (``runs`` per side).
      max_sensitivity: largest L2 change of the released histograms between paired runs (claim: 1).
      off_lattice_values: released values off the lattice (claim: 0).
      passed: no check detected a violation.
      findings: one line per failed check.
      seconds: wall time of the audit.
    """

    runner: str
    epsilon_lower_bound: float
    score_bounds: dict[str, float]
    claimed_epsilon: float
    delta: float
    confidence: float
    runs: int
    max_sensitivity: float
    off_lattice_values: int
    passed: bool
    findings: tuple[str, ...]
    seconds: float

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "violation"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["verdict"] = self.verdict
        return out

    def summary(self) -> str:
        lines = [
            f"audited: {self.runner}.run (the shipped run) on D and D + canary, {self.runs} runs each, "
            f"fresh public and secret noise keys per run",
            f"claimed epsilon (run ledger): {self.claimed_epsilon:.4f} at delta {self.delta:g}",
            f"empirical epsilon lower bound: {self.epsilon_lower_bound:.4f} ({self.confidence:.0%} "
            "confidence)  "
            + "  ".join(f"[{name}: {value:.3f}]" for name, value in self.score_bounds.items()),
            f"largest change of the released histograms between paired runs: {self.max_sensitivity:.4f} "
            "(claimed sensitivity 1)",
            f"released values off the integer lattice: {self.off_lattice_values}",
        ]
        lines += [f"finding: {f}" for f in self.findings]
        lines.append("verdict: pass" if self.passed else "verdict: VIOLATION")
        return "\n".join(lines)


def audit_run(
    *,
    runner: str | type[PrivateEvolution] = "correct",
    setup: RunAuditSetup | None = None,
    epsilon: float = 1.0,
    delta: float = 1e-5,
    iterations: int = 2,
    candidates_per_class: int = 8,
    runs: int = 200,
    pairs: int = 4,
    confidence: float = 0.95,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunAuditReport:
    """Audits ``PrivateEvolution.run`` (or a planted bug) as a black box; see the module docstring.

    Args:
      runner: ``"correct"`` (pejax's ``PrivateEvolution``), a name in :data:`PLANTED_BUGS`, or a subclass.
      setup: the neighbouring data sets (default :func:`make_run_audit_setup`).
      epsilon, delta: the run's privacy target (the claim under audit).
      iterations: T.
      candidates_per_class: synthetic candidates of each class (classes get equal, public proportions).
      runs: runs per side, >= 50.
      pairs: paired runs for the sensitivity check.
      confidence: of the statistical bound, in (0.5, 1).
      seed: offset of the public keys (``None``: random). Noise keys are always fresh secrets.
      progress: called with (runs done, runs total).

    Returns:
      a :class:`RunAuditReport`.
    """
    from pejax.auditing import epsilon_lower_bound

    cls = _runner_class(runner)
    setup = setup or make_run_audit_setup()
    runs = _validate.positive_int("runs", runs, minimum=50)
    pairs = _validate.positive_int("pairs", pairs)
    t_total = _validate.positive_int("iterations", iterations)
    m = _validate.positive_int("candidates_per_class", candidates_per_class, minimum=2)
    c = setup.num_classes
    pe = PEConfig(
        num_classes=c,
        samples_per_iteration=m * c,
        iterations=t_total,
        k=1,
        min_samples_per_class=2,
        output="population",
        degrees=(0.3, 0.1),
    )
    privacy = PrivacyConfig(epsilon=epsilon, delta=delta, class_proportions=tuple([1.0 / c] * c))
    gen = PointGenerator(setup.private.shape[2])
    run = cls(generator=gen, embedding=_identity, pe=pe, privacy=privacy)
    offset = secrets.randbits(30) if seed is None else int(seed)
    start = time.perf_counter()
    scores = {True: [], False: []}
    off_lattice, sigma, claimed = 0, None, None
    for i in range(runs):
        for include in (True, False):
            key = jax.random.key(offset + 2 * i + int(include))
            tr = _one_run(run, setup, include, key)
            if sigma is None:
                result_plan = run._plan(len(setup.labels) + int(include))
                sigma = result_plan.sigma
                claimed = _claimed(run, result_plan)
            scores[include].append(_scores(tr, setup, sigma, t_total))
            off_lattice += _off_lattice(tr, pe.k)
        if progress is not None:
            progress(i + 1, runs)
    sens = 0.0
    for j in range(pairs):
        key = jax.random.key(offset + 2 * runs + j)
        noise_key = NoiseKey.generate()
        a = _one_run(run, setup, True, key, noise_key)
        b = _one_run(run, setup, False, key, noise_key)
        sens = max(sens, _pair_sensitivity(a, b, t_total, c))
    s_in, s_out = np.asarray(scores[True]), np.asarray(scores[False])
    alpha_conf = 1.0 - (1.0 - confidence) / len(SCORES)
    bounds = {
        name: epsilon_lower_bound(s_in[:, j], s_out[:, j], delta=delta, confidence=alpha_conf)
        for j, name in enumerate(SCORES)
    }
    lower = max(bounds.values())
    findings = []
    if lower > claimed:
        findings.append(f"empirical epsilon {lower:.3f} exceeds the claimed {claimed:.3f}")
    if sens > 1.0 + 1e-6:
        findings.append(f"one sample moved the released histograms by {sens:.3f} > 1 (sensitivity)")
    if off_lattice:
        findings.append(
            f"{off_lattice} released values are off the lattice (floating-point support)"
        )
    return RunAuditReport(
        runner=cls.__name__,
        epsilon_lower_bound=lower,
        score_bounds=bounds,
        claimed_epsilon=claimed,
        delta=delta,
        confidence=confidence,
        runs=runs,
        max_sensitivity=sens,
        off_lattice_values=off_lattice,
        passed=not findings,
        findings=tuple(findings),
        seconds=time.perf_counter() - start,
    )


def _claimed(run: PrivateEvolution, plan) -> float:
    from pejax.accounting import PrivacyLedger

    ledger = PrivacyLedger(delta=plan.delta)
    return ledger.epsilon_if(run._planned(plan.sigma, plan.sigma_counts), run.privacy.accountant)


def _runner_class(runner) -> type[PrivateEvolution]:
    if isinstance(runner, type) and issubclass(runner, PrivateEvolution):
        return runner
    if runner == "correct":
        return PrivateEvolution
    if runner in PLANTED_BUGS:
        return PLANTED_BUGS[runner]
    raise ValueError(
        f"runner must be 'correct', one of {sorted(PLANTED_BUGS)}, or a PrivateEvolution subclass; got "
        f"{runner!r}."
    )


__all__ = [
    "PLANTED_BUGS",
    "SCORES",
    "PointGenerator",
    "RunAuditReport",
    "RunAuditSetup",
    "audit_run",
    "make_run_audit_setup",
]
