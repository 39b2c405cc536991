"""Privacy accounting for Private Evolution, built on Google's ``dp_accounting``.

Every noisy release of PE is a Gaussian mechanism on a histogram of L2 sensitivity 1 (see :mod:`pejax.votes`):
the ``dp_accounting`` event ``GaussianDpEvent(noise_multiplier)``. Classes partition the private data, so the
per-class histograms of one iteration compose in parallel and cost one event together. T iterations are
``SelfComposedDpEvent(GaussianDpEvent(sigma), T)``.

Accountants (``accountant=``):

* ``"pld"`` (default): privacy loss distributions. For compositions of Gaussian mechanisms it is exact up to
  a discretisation error far below the reported digits, and it matches the closed form below.
* ``"rdp"``: Renyi DP. Valid but loose: about 8% larger epsilon for PE's settings (2.81 instead of 2.59 at
  sigma = 5 sqrt(2), T = 20, delta = 1e-5), because the RDP-to-(epsilon, delta) conversion is lossy.
* ``"gaussian"``: the closed form. T Gaussian mechanisms with multipliers sigma_i compose exactly into one
  Gaussian mechanism with multiplier ``(sum_i sigma_i^-2)^(-1/2)`` (Gaussian DP, mu = sqrt(T)/sigma), whose
  exact epsilon is ``dp_accounting.get_epsilon_gaussian``. It is a cross-check only valid for pure Gaussian
  compositions.

This module builds events and asks ``dp_accounting`` for epsilons; it holds no epsilon formula of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import attr
import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from pejax import _validate
from pejax.errors import BudgetExceededError as BudgetExceededError
from pejax.votes import HISTOGRAM_SENSITIVITY
from pejax.votes import NEIGHBORING_RELATION_SAMPLE
from pejax.votes import NEIGHBORING_RELATIONS
from pejax.votes import REPLACE_RELATIONS

ACCOUNTANTS = ("pld", "rdp", "gaussian")
DEFAULT_ACCOUNTANT = "pld"
MECHANISMS = ("gaussian", "discrete_gaussian")
"""Noise mechanisms a :class:`Release` can describe. PE runs release ``"discrete_gaussian"`` (see
:mod:`pejax.secure_noise`); ``"gaussian"`` describes the continuous kernel :func:`pejax.add_gaussian_noise`."""

# The range of inputs pejax accounts for (every accountant alike), so that no input makes dp-accounting run for
# minutes or allocate terabytes (see BUILD_NOTES.md, "Bad input"). Measured on one CPU core with PLD:
# * the effective multiplier sigma / sqrt(T) (the composition's single Gaussian) sets the PLD's grid size, which
#   grows as 1 / (sigma/sqrt(T))^2 for small values: 2.5 s at 0.2, minutes or out of memory near 0.01. Below
#   MIN_EFFECTIVE_NOISE_MULTIPLIER epsilon exceeds about 30 at delta = 1e-5: no meaningful privacy.
# * epsilon below MIN_EPSILON: the PLD's 1e-4 loss discretisation becomes a percent-level error, and the
#   runner's plan (one release per iteration, each discretised) then needs many noise increments to fit.
# * delta below MIN_DELTA: the PLD truncates the privacy-loss tails and reports inf below about 1e-20, and is
#   already 1% off at 1e-15; 1e-12 covers 1/(n ln n) for n up to 3e10 private samples.
# * iterations above MAX_ITERATIONS: far beyond any PE run (each iteration calls the generator on the whole
#   population), and a guard against typos such as 1000000000.
MIN_EPSILON = 0.01
MAX_EPSILON = 30.0
MIN_DELTA = 1e-12
MAX_ITERATIONS = 1_000_000
MIN_EFFECTIVE_NOISE_MULTIPLIER = 0.2


def _check_epsilon_range(eps: float, name: str = "epsilon") -> float:
    if not MIN_EPSILON <= eps <= MAX_EPSILON:
        raise ValueError(
            f"{name}={eps:g} is outside the range pejax accounts for, [{MIN_EPSILON:g}, {MAX_EPSILON:g}]: "
            + (
                "below it the accountant's discretisation error is comparable to epsilon itself"
                if eps < MIN_EPSILON
                else "above it the privacy guarantee is void and PLD accounting needs minutes to terabytes"
            )
            + f". Use an epsilon in [{MIN_EPSILON:g}, {MAX_EPSILON:g}] (for a run without privacy: "
            "noise_multiplier = 0)."
        )
    return eps


def _check_delta_range(delta: float, name: str = "delta") -> float:
    if delta < MIN_DELTA:
        raise ValueError(
            f"{name}={delta:g} is below {MIN_DELTA:g}, the smallest delta pejax accounts for (the PLD "
            "accountant truncates privacy-loss tails and cannot resolve smaller deltas). Use e.g. "
            f"{name} = 1 / (n ln n) for n private samples (1e-11 for n = 5e9)."
        )
    return delta


def _check_iterations(iterations, name: str = "iterations") -> int:
    t = _validate.positive_int(name, iterations)
    if t > MAX_ITERATIONS:
        raise ValueError(
            f"{name}={t} is above {MAX_ITERATIONS}, the most iterations pejax accounts for (PE runs use tens "
            "of iterations). Use fewer iterations."
        )
    return t


def _check_effective_noise(noise_multiplier: float, iterations: int, name: str) -> None:
    effective = noise_multiplier / math.sqrt(iterations)
    if 0 < effective < MIN_EFFECTIVE_NOISE_MULTIPLIER:
        need = MIN_EFFECTIVE_NOISE_MULTIPLIER * math.sqrt(iterations)
        raise ValueError(
            f"{name}={noise_multiplier:g} over {iterations} iteration(s) is a composed noise multiplier "
            f"sigma/sqrt(T) = {effective:.3g}, below {MIN_EFFECTIVE_NOISE_MULTIPLIER:g}: epsilon would exceed "
            "about 30 (no meaningful privacy) and PLD accounting would take minutes or exhaust memory. Use "
            f"{name} >= {need:.4g} for {iterations} iteration(s), or 0 for no privacy at all."
        )


def gaussian_event(noise_multiplier: float, iterations: int = 1) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of ``iterations`` Gaussian releases of sensitivity 1 with one multiplier."""
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if iterations == 1:
        return event
    return dp_accounting.SelfComposedDpEvent(event, iterations)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DiscreteGaussianDpEvent(dp_accounting.DpEvent):
    """The discrete Gaussian mechanism on an integer lattice (pejax's event; dp-accounting has none).

    The mechanism returns ``f(D) + Z`` with f integer-valued and ``Z_j ~ N_Z(0, sigma^2)`` i.i.d. (Canonne,
    Kamath, Steinke 2020). Attributes:

    * ``sigma``: the noise scale in lattice units.
    * ``unit_changes``: neighbouring data sets change f by +-1 in at most this many coordinates (and by nothing
      elsewhere); the exact privacy loss is then the ``unit_changes``-fold composition of the one-dimensional
      discrete Gaussian with sensitivity 1, which the PLD accountant builds with
      ``dp_accounting``'s ``from_discrete_gaussian_mechanism``. ``None``: f changes by an arbitrary integer
      vector of L2 norm at most ``l2_sensitivity``; only the zCDP bound is then known.
    * ``l2_sensitivity``: the largest L2 norm of that change (``sqrt(unit_changes)`` when that is given).

    Every accountant also knows its zCDP guarantee ``rho = l2_sensitivity^2 / (2 sigma^2)`` (their Theorem 14), as
    ``dp_accounting``'s own ``ZCDpEvent``: that is how the RDP accountant composes it.
    """

    sigma: float
    l2_sensitivity: float
    unit_changes: int | None = None

    def zcdp_event(self) -> dp_accounting.ZCDpEvent:
        return dp_accounting.ZCDpEvent(rho=self.l2_sensitivity**2 / (2.0 * self.sigma**2))


_PLD_INTERVAL = 1e-4


@functools.lru_cache(maxsize=256)
def _discrete_gaussian_pld(sigma: float, compositions: int):
    """Exact (pessimistic) PLD of ``compositions`` 1-D discrete Gaussians of sensitivity 1 (cached)."""
    one = privacy_loss_distribution.from_discrete_gaussian_mechanism(
        sigma, sensitivity=1, value_discretization_interval=_PLD_INTERVAL
    )
    return one.self_compose(compositions)


class _PLDAccountant(pld_privacy_accountant.PLDAccountant):
    """dp-accounting's PLD accountant, taught :class:`DiscreteGaussianDpEvent` with unit changes."""

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, DiscreteGaussianDpEvent):
            if event.unit_changes is None:
                return self.CompositionErrorDetails(
                    invalid_event=event,
                    error_message=(
                        "the PLD of a discrete Gaussian with a general (non-unit) sensitivity vector is not "
                        "implemented; use accountant='rdp', which composes its exact zCDP guarantee."
                    ),
                )
            if do_compose:
                if event.sigma == 0:
                    self._contains_non_dp_event = True
                else:
                    pld = _discrete_gaussian_pld(float(event.sigma), event.unit_changes * count)
                    self._pld = self._pld.compose(pld)
            return None
        return super()._maybe_compose(event, count, do_compose)


class _RdpAccountant(rdp_privacy_accountant.RdpAccountant):
    """dp-accounting's RDP accountant; a :class:`DiscreteGaussianDpEvent` composes as its ``ZCDpEvent``."""

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, DiscreteGaussianDpEvent):
            if event.sigma == 0:
                return super()._maybe_compose(dp_accounting.NonPrivateDpEvent(), count, do_compose)
            return super()._maybe_compose(event.zcdp_event(), count, do_compose)
        return super()._maybe_compose(event, count, do_compose)


def _relation(neighboring_relation: str) -> dp_accounting.NeighboringRelation:
    if neighboring_relation in REPLACE_RELATIONS:
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _make_accountant(
    accountant: str, neighboring_relation: str = NEIGHBORING_RELATION_SAMPLE
) -> dp_accounting.PrivacyAccountant:
    relation = _relation(neighboring_relation)
    if accountant == "pld":
        return _PLDAccountant(relation, value_discretization_interval=_PLD_INTERVAL)
    if accountant == "rdp":
        return _RdpAccountant(neighboring_relation=relation)
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")


def _gaussian_precision(event: dp_accounting.DpEvent) -> tuple[float, int]:
    """``(sum_i sigma_i^-2, number of releases)`` of a composition of Gaussian events (for the closed form).

    A zero multiplier gives an infinite precision. Self-compositions are multiplied out, never expanded.
    """
    if isinstance(event, dp_accounting.GaussianDpEvent):
        s = event.noise_multiplier
        return (math.inf if s == 0 else s**-2), 1
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        p, n = _gaussian_precision(event.event)
        return p * event.count, n * event.count
    if isinstance(event, dp_accounting.ComposedDpEvent):
        parts = [_gaussian_precision(e) for e in event.events]
        return sum(p for p, _ in parts), sum(n for _, n in parts)
    if isinstance(event, DiscreteGaussianDpEvent):
        # Cross-check only: the continuous Gaussian with the same multiplier (the 'pld' value is exact).
        m = event.sigma / event.l2_sensitivity if event.l2_sensitivity else 0.0
        return (math.inf if m == 0 else m**-2), 1
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return 0.0, 0
    raise dp_accounting.UnsupportedEventError(
        f"the closed-form 'gaussian' accountant only composes Gaussian events, got {event!r}; "
        "use accountant='pld' or 'rdp'."
    )


def epsilon_of_event(
    event: dp_accounting.DpEvent,
    *,
    delta: float,
    accountant: str,
    neighboring_relation: str = NEIGHBORING_RELATION_SAMPLE,
) -> float:
    """Epsilon of any ``dp_accounting`` event at ``delta`` under ``accountant``.

    ``neighboring_relation`` is passed on to ``dp_accounting`` (add/remove or replace-one); the events' own
    sensitivities must already be those of that relation.
    """
    _validate.one_of("accountant", accountant, ACCOUNTANTS)
    delta = _check_delta_range(_validate.delta(delta))
    try:
        precision, releases = _gaussian_precision(event)
    except dp_accounting.UnsupportedEventError:
        if accountant == "gaussian":
            raise
        precision, releases = None, 0
    if precision is not None:
        # Bound the accountant's work before calling it (see MIN_EFFECTIVE_NOISE_MULTIPLIER).
        if releases == 0:
            return 0.0
        if math.isinf(precision):
            return math.inf
        _check_iterations(releases, "releases in the event")
        effective = precision**-0.5
        _check_effective_noise(effective, 1, "effective noise multiplier of the composition")
        if accountant == "gaussian":
            return float(dp_accounting.get_epsilon_gaussian(effective, delta))
    acc = _make_accountant(accountant, neighboring_relation)
    if not acc.supports(event):
        details = acc._maybe_compose(event, 1, False)
        raise dp_accounting.UnsupportedEventError(
            f"the {accountant!r} accountant cannot compose {details.invalid_event!r}: "
            f"{details.error_message}"
        )
    return float(acc.compose(event).get_epsilon(delta))


def _check_noise(noise_multiplier: Any) -> float:
    return _validate.finite_float("noise_multiplier", noise_multiplier, minimum=0.0)


def epsilon(
    *, noise_multiplier: float, iterations: int, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon spent by ``iterations`` PE iterations with Gaussian noise ``noise_multiplier``.

    Args:
      noise_multiplier: noise standard deviation divided by the histogram's L2 sensitivity (1), >= 0.
      iterations: number of noisy histogram releases T >= 1 (classes compose in parallel: count iterations,
        not classes).
      delta: target delta in (0, 1).
      accountant: ``"pld"`` (default, exact), ``"rdp"`` or ``"gaussian"`` (closed form).

    Returns:
      epsilon (``inf`` for ``noise_multiplier == 0``).

    Example:
      >>> round(epsilon(noise_multiplier=5 * 2**0.5, iterations=20, delta=1e-5), 3)
      2.594
    """
    nm = _check_noise(noise_multiplier)
    t = _check_iterations(iterations)
    _check_delta_range(_validate.delta(delta))
    _validate.one_of("accountant", accountant, ACCOUNTANTS)
    if nm == 0:
        return math.inf
    _check_effective_noise(nm, t, "noise_multiplier")
    return epsilon_of_event(gaussian_event(nm, t), delta=delta, accountant=accountant)


def noise_multiplier(
    *, epsilon: float, iterations: int, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Smallest noise multiplier whose ``iterations`` releases stay within (epsilon, delta).

    Calibrated with ``dp_accounting.calibrate_dp_mechanism`` (``"pld"``, ``"rdp"``) or the exact inverse of
    the closed form (``"gaussian"``: ``get_sigma_gaussian(epsilon, delta) * sqrt(T)``).

    Example:
      >>> round(noise_multiplier(epsilon=2.5944, iterations=20, delta=1e-5), 2)
      7.07
    """
    eps = _check_epsilon_range(_validate.epsilon(epsilon))
    t = _check_iterations(iterations)
    dl = _check_delta_range(_validate.delta(delta))
    _validate.one_of("accountant", accountant, ACCOUNTANTS)
    closed_form = float(dp_accounting.get_sigma_gaussian(eps, dl) * math.sqrt(t))
    if closed_form / math.sqrt(t) < MIN_EFFECTIVE_NOISE_MULTIPLIER:
        raise ValueError(
            f"epsilon={eps:g} at delta={dl:g} needs a composed noise multiplier sigma/sqrt(T) of only "
            f"{closed_form / math.sqrt(t):.3g}, below {MIN_EFFECTIVE_NOISE_MULTIPLIER:g}: PLD accounting would "
            "take minutes or exhaust memory, and the guarantee would be void. Use a smaller epsilon or delta."
        )
    if accountant == "gaussian":
        return closed_form
    # The exact closed form brackets the answer: PLD agrees with it, RDP needs a somewhat larger multiplier.
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: _make_accountant(accountant),
        lambda s: gaussian_event(s, t),
        eps,
        dl,
        bracket_interval=dp_accounting.ExplicitBracketInterval(
            0.5 * closed_form, 2.0 * closed_form
        ),
        tol=1e-6,
    )
    # calibrate_dp_mechanism returns a value within tol on the safe side; check it and step up if needed
    # (in steps that double, so the loop ends after a few dozen accountant calls at most).
    step = 1e-6
    for _ in range(40):
        if epsilon_of_event(gaussian_event(sigma, t), delta=dl, accountant=accountant) <= eps:
            return float(sigma)
        sigma *= 1.0 + step
        step *= 2.0
    raise RuntimeError(  # pragma: no cover - the bracket starts at twice the exact closed form
        f"could not calibrate a noise multiplier for epsilon={eps:g}, delta={dl:g}, iterations={t} with the "
        f"{accountant!r} accountant."
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Release:
    """One noisy release of private information, as recorded by :class:`PrivacyLedger`.

    Attributes:
      iteration: the PE iteration it belongs to (0 for releases made before the loop, e.g. class counts).
      noise_multiplier: noise standard deviation divided by ``sensitivity``.
      sensitivity: L2 sensitivity of the released quantity under ``neighboring_relation``.
      neighboring_relation: one of :data:`pejax.votes.NEIGHBORING_RELATIONS` (add/remove or replace one sample
        or one group).
      description: what was released (e.g. ``"vote histogram"`` or ``"class counts"``).
      count: how many identical releases this entry stands for (1 unless composed in bulk).
      mechanism: ``"discrete_gaussian"`` (integer lattice values plus exact discrete Gaussian noise of scale
        ``noise_multiplier * sensitivity`` lattice units: what PE runs release) or ``"gaussian"`` (continuous).
      unit_changes: discrete Gaussian only: neighbours differ by +-1 in at most this many lattice coordinates
        (then ``sensitivity`` is ``sqrt(unit_changes)`` and the PLD accountant is exact); ``None`` for a general
        integer change of L2 norm <= ``sensitivity`` (zCDP accounting, ``accountant="rdp"``).
    """

    iteration: int
    noise_multiplier: float
    sensitivity: float = HISTOGRAM_SENSITIVITY
    neighboring_relation: str = NEIGHBORING_RELATION_SAMPLE
    description: str = "vote histogram"
    count: int = 1
    mechanism: str = "gaussian"
    unit_changes: int | None = None

    def __post_init__(self):
        _validate.positive_int("iteration", self.iteration, minimum=0)
        _check_noise(self.noise_multiplier)
        _validate.finite_float("sensitivity", self.sensitivity, minimum=0.0, strict=True)
        _validate.positive_int("count", self.count)
        _validate.one_of("neighboring_relation", self.neighboring_relation, NEIGHBORING_RELATIONS)
        _validate.one_of("mechanism", self.mechanism, MECHANISMS)
        if self.unit_changes is not None:
            if self.mechanism != "discrete_gaussian":
                raise ValueError(
                    "unit_changes is only meaningful for mechanism='discrete_gaussian'."
                )
            k = _validate.positive_int("unit_changes", self.unit_changes)
            if abs(self.sensitivity - math.sqrt(k)) > 1e-9 * math.sqrt(k):
                raise ValueError(
                    f"a release with unit_changes={k} has L2 sensitivity sqrt({k}) = {math.sqrt(k):.6g}, "
                    f"got sensitivity={self.sensitivity}."
                )

    def dp_event(self) -> dp_accounting.DpEvent:
        """The event of this release: ``GaussianDpEvent`` or :class:`DiscreteGaussianDpEvent` (``count`` times)."""
        if self.mechanism == "gaussian":
            return gaussian_event(self.noise_multiplier, self.count)
        event = DiscreteGaussianDpEvent(
            sigma=self.noise_multiplier * self.sensitivity,
            l2_sensitivity=self.sensitivity,
            unit_changes=self.unit_changes,
        )
        return event if self.count == 1 else dp_accounting.SelfComposedDpEvent(event, self.count)


@functools.lru_cache(maxsize=1024)
def _ledger_epsilon(delta: float, releases: tuple[Release, ...], accountant: str) -> float:
    """Epsilon of a tuple of (frozen, hashable) releases; cached, since runs ask again after every iteration."""
    event = dp_accounting.ComposedDpEvent([r.dp_event() for r in releases])
    return epsilon_of_event(
        event,
        delta=delta,
        accountant=accountant,
        neighboring_relation=releases[0].neighboring_relation,
    )


class PrivacyLedger:
    """Records every noisy release of a run and reports the privacy spent so far under each accountant.

    The ledger is the source of truth for what a run spent: it is saved in every checkpoint, so a resumed run
    continues it and never records (or spends) an iteration twice.

    Example:
      >>> ledger = PrivacyLedger(delta=1e-5)
      >>> for t in range(1, 21):
      ...     ledger.record(Release(iteration=t, noise_multiplier=5 * 2**0.5))
      >>> round(ledger.epsilon("pld"), 3)
      2.594
    """

    def __init__(self, *, delta: float, releases: Sequence[Release] = ()):
        self.delta = _validate.delta(delta)
        self._releases: list[Release] = []
        for release in releases:
            self.record(release)

    @property
    def releases(self) -> tuple[Release, ...]:
        return tuple(self._releases)

    def __len__(self) -> int:
        return len(self._releases)

    def record(self, release: Release) -> None:
        """Appends a release; refuses a second vote-histogram release for an iteration already recorded."""
        if not isinstance(release, Release):
            raise TypeError(
                f"record() takes a pejax.accounting.Release, got {type(release).__name__}."
            )
        if self._releases and _relation(release.neighboring_relation) != _relation(
            self._releases[0].neighboring_relation
        ):
            raise ValueError(
                "a ledger composes releases under one kind of neighbouring relation (add/remove or "
                f"replace-one): it has {self._releases[0].neighboring_relation!r}, got "
                f"{release.neighboring_relation!r}."
            )
        for r in self._releases:
            if r.iteration == release.iteration and r.description == release.description:
                raise ValueError(
                    f"iteration {release.iteration} already has a {release.description!r} release in the "
                    "ledger; recording it again would count (or spend) its privacy twice."
                )
        self._releases.append(release)

    def dp_event(self) -> dp_accounting.DpEvent:
        """Composition of every recorded release."""
        if not self._releases:
            return dp_accounting.NoOpDpEvent()
        return dp_accounting.ComposedDpEvent([r.dp_event() for r in self._releases])

    def epsilon(self, accountant: str = DEFAULT_ACCOUNTANT) -> float:
        """Epsilon spent so far at the ledger's delta."""
        if not self._releases:
            return 0.0
        if any(r.noise_multiplier == 0 for r in self._releases):
            return math.inf
        return _ledger_epsilon(self.delta, tuple(self._releases), accountant)

    def supports(self, accountant: str) -> bool:
        """Whether ``accountant`` can compose every recorded release (PLD cannot compose discrete Gaussian
        releases of general sensitivity, e.g. user-level votes)."""
        _validate.one_of("accountant", accountant, ACCOUNTANTS)
        if accountant == "gaussian":
            return True
        return _make_accountant(accountant).supports(self.dp_event())

    def epsilons(self) -> dict[str, float]:
        """Epsilon spent so far under every accountant that supports the releases.

        For discrete Gaussian releases, ``"gaussian"`` is the continuous Gaussian's closed form with the same
        multipliers: a cross-check, not a bound for the implemented mechanism (``"pld"`` is exact for it).
        """
        return {name: self.epsilon(name) for name in ACCOUNTANTS if self.supports(name)}

    def epsilon_if(self, planned: Sequence[Release], accountant: str = DEFAULT_ACCOUNTANT) -> float:
        """Epsilon the ledger would show after also recording ``planned`` (nothing is recorded)."""
        trial = PrivacyLedger(delta=self.delta, releases=[*self._releases, *planned])
        return trial.epsilon(accountant)

    def check_budget(
        self, planned: Sequence[Release], *, epsilon: float, accountant: str = DEFAULT_ACCOUNTANT
    ) -> float:
        """Raises :class:`BudgetExceededError` if ``planned`` would take the ledger above ``epsilon``.

        Returns:
          the epsilon the ledger would show after the planned releases.
        """
        target = _validate.epsilon(epsilon)
        after = self.epsilon_if(planned, accountant)
        if after > target * (1 + 1e-9):
            raise BudgetExceededError(
                f"the planned releases would spend epsilon={after:.6g} under the {accountant!r} accountant at "
                f"delta={self.delta:g}, above the target epsilon={target:g} (already spent: "
                f"{self.epsilon(accountant):.6g}). Raise the noise multiplier, run fewer iterations, or "
                "raise the target."
            )
        return after

    def to_json(self) -> str:
        """Serialises the ledger (delta and releases) to JSON."""
        return json.dumps(
            {"delta": self.delta, "releases": [dataclasses.asdict(r) for r in self._releases]},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on malformed input."""
        try:
            data = json.loads(text)
            return cls(delta=data["delta"], releases=[Release(**r) for r in data["releases"]])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed privacy ledger JSON: {e}") from e

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PrivacyLedger)
            and self.delta == other.delta
            and self._releases == other._releases
        )

    def __repr__(self) -> str:
        return f"PrivacyLedger(delta={self.delta:g}, releases={len(self._releases)})"


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "BudgetExceededError",
    "PrivacyLedger",
    "Release",
    "epsilon",
    "epsilon_of_event",
    "gaussian_event",
    "noise_multiplier",
]
