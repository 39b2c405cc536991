import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
import scipy.stats
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from pejax import accounting
from pejax.accounting import PrivacyLedger
from pejax.accounting import Release


def _delta_nln(n):
    return 1.0 / (n * math.log(n))


def _gaussian_dp_delta(eps, mu):
    """Balle & Wang (2018): exact delta of a mu-GDP mechanism, written independently of the library."""
    return scipy.stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * scipy.stats.norm.cdf(
        -eps / mu - mu / 2
    )


VECTORS = [
    # (noise multiplier, iterations, delta, expected epsilon for PLD and the closed form, places)
    (5 * math.sqrt(2), 20, 1e-5, 2.5944, 4),
    (15.34, 10, _delta_nln(1_939_290), 1.0045, 4),
    (11.60, 10, _delta_nln(8_396), 0.99999, 5),
]


@pytest.mark.parametrize("accountant", ["pld", "gaussian"])
@pytest.mark.parametrize("sigma,t,delta,expected,places", VECTORS)
def test_reference_vectors(sigma, t, delta, expected, places, accountant):
    eps = accounting.epsilon(
        noise_multiplier=sigma, iterations=t, delta=delta, accountant=accountant
    )
    assert round(eps, places) == pytest.approx(expected, abs=10**-places)


def test_rdp_is_about_eight_percent_looser():
    kw = dict(noise_multiplier=5 * math.sqrt(2), iterations=20, delta=1e-5)
    rdp = accounting.epsilon(accountant="rdp", **kw)
    pld = accounting.epsilon(accountant="pld", **kw)
    assert rdp == pytest.approx(2.8137, abs=1e-3)
    assert 1.05 < rdp / pld < 1.12


@pytest.mark.parametrize("sigma,t,delta", [(v[0], v[1], v[2]) for v in VECTORS] + [(2.0, 3, 1e-6)])
def test_matches_dp_accounting_and_independent_closed_form(sigma, t, delta):
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), t)
    pld = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta)
    rdp = rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(delta)
    kw = dict(noise_multiplier=sigma, iterations=t, delta=delta)
    assert accounting.epsilon(accountant="pld", **kw) == pytest.approx(pld, rel=1e-12)
    assert accounting.epsilon(accountant="rdp", **kw) == pytest.approx(rdp, rel=1e-12)
    closed = accounting.epsilon(accountant="gaussian", **kw)
    # At the closed-form epsilon the Gaussian-DP delta (mu = sqrt(T)/sigma) equals the target delta.
    assert _gaussian_dp_delta(closed, math.sqrt(t) / sigma) == pytest.approx(delta, rel=1e-6)
    assert pld == pytest.approx(closed, rel=2e-4)


@pytest.mark.parametrize("accountant", ["pld", "rdp", "gaussian"])
@pytest.mark.parametrize(
    "eps,t,delta", [(1.0, 10, 1e-5), (4.0, 5, _delta_nln(1347)), (0.3, 1, 1e-6)]
)
def test_calibration_round_trip(accountant, eps, t, delta):
    sigma = accounting.noise_multiplier(
        epsilon=eps, iterations=t, delta=delta, accountant=accountant
    )
    back = accounting.epsilon(
        noise_multiplier=sigma, iterations=t, delta=delta, accountant=accountant
    )
    assert back <= eps * (1 + 1e-9)
    assert back == pytest.approx(eps, rel=1e-4)


def test_zero_noise_is_infinite_epsilon():
    assert accounting.epsilon(noise_multiplier=0.0, iterations=3, delta=1e-5) == math.inf


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0.0), "epsilon must be a finite number > 0"),
        (dict(epsilon=-1.0), "epsilon must be a finite number > 0"),
        (dict(epsilon=float("nan")), "epsilon must be a finite number > 0"),
        (dict(delta=0.0), "delta must lie strictly between 0 and 1"),
        (dict(delta=1.0), "delta must lie strictly between 0 and 1"),
        (dict(delta=-1e-5), "delta must lie strictly between 0 and 1"),
        (dict(iterations=0), "iterations must be an integer >= 1"),
        (dict(accountant="moments"), "accountant must be one of"),
    ],
)
def test_calibration_bad_inputs(kwargs, match):
    args = dict(epsilon=1.0, iterations=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=match):
        accounting.noise_multiplier(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier must be finite"),
        (dict(delta=1.5), "delta must lie strictly between 0 and 1"),
        (dict(iterations=2.5), "iterations must be an integer"),
    ],
)
def test_epsilon_bad_inputs(kwargs, match):
    args = dict(noise_multiplier=1.0, iterations=10, delta=1e-5) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        accounting.epsilon(**args)


def test_ledger_matches_composition_under_every_accountant():
    ledger = PrivacyLedger(delta=1e-5)
    assert ledger.epsilon() == 0.0
    for t in range(1, 21):
        ledger.record(Release(iteration=t, noise_multiplier=5 * math.sqrt(2)))
    eps = ledger.epsilons()
    assert set(eps) == {"pld", "rdp", "gaussian"}
    for name, value in eps.items():
        direct = accounting.epsilon(
            noise_multiplier=5 * math.sqrt(2), iterations=20, delta=1e-5, accountant=name
        )
        assert value == pytest.approx(direct, rel=1e-3)


def test_ledger_heterogeneous_releases():
    ledger = PrivacyLedger(delta=1e-6)
    ledger.record(Release(iteration=0, noise_multiplier=40.0, description="class counts"))
    for t in range(1, 6):
        ledger.record(Release(iteration=t, noise_multiplier=8.0))
    closed = ledger.epsilon("gaussian")
    effective = (40.0**-2 + 5 * 8.0**-2) ** -0.5
    assert closed == pytest.approx(dp_accounting.get_epsilon_gaussian(effective, 1e-6), rel=1e-9)
    assert ledger.epsilon("pld") == pytest.approx(closed, rel=1e-3)
    assert ledger.epsilon("rdp") > closed


def test_ledger_refuses_double_spending():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.record(Release(iteration=1, noise_multiplier=3.0))
    with pytest.raises(ValueError, match="already has a 'vote histogram' release"):
        ledger.record(Release(iteration=1, noise_multiplier=3.0))


def test_ledger_budget_check():
    ledger = PrivacyLedger(delta=1e-5)
    planned = [Release(iteration=t, noise_multiplier=5 * math.sqrt(2)) for t in range(1, 21)]
    assert ledger.check_budget(planned, epsilon=2.6) == pytest.approx(2.5944, abs=1e-4)
    with pytest.raises(accounting.BudgetExceededError, match=r"above the target epsilon=2\.5"):
        ledger.check_budget(planned, epsilon=2.5)
    assert len(ledger) == 0  # checking records nothing


def test_ledger_json_round_trip_and_corruption():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.record(Release(iteration=0, noise_multiplier=20.0, description="class counts"))
    ledger.record(
        Release(iteration=1, noise_multiplier=3.0, neighboring_relation="add_or_remove_one_group")
    )
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger
    assert again.epsilon("pld") == ledger.epsilon("pld")
    with pytest.raises(ValueError, match="malformed privacy ledger"):
        PrivacyLedger.from_json('{"delta": 1e-5}')


def test_release_validation():
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        Release(iteration=1, noise_multiplier=-2.0)
    with pytest.raises(ValueError, match="sensitivity must be > 0"):
        Release(iteration=1, noise_multiplier=2.0, sensitivity=0.0)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(delta=2.0)
    assert np.isinf(
        PrivacyLedger(delta=1e-5, releases=[Release(iteration=1, noise_multiplier=0.0)]).epsilon()
    )


# ---- the discrete Gaussian releases of PE runs


@pytest.mark.parametrize("sigma,units,count", [(3.11, 1, 10), (7.5, 2, 5), (1.2, 4, 3)])
def test_discrete_gaussian_pld_is_dp_accountings_own(sigma, units, count):
    """The ledger's PLD of a discrete Gaussian release equals dp-accounting's from_discrete_gaussian_mechanism,
    self-composed over the unit changes and releases, computed directly here."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    release = Release(
        iteration=1,
        noise_multiplier=sigma / np.sqrt(units),
        sensitivity=np.sqrt(units),
        mechanism="discrete_gaussian",
        unit_changes=units,
        count=count,
    )
    ledger = PrivacyLedger(delta=1e-5, releases=[release])
    lattice_sigma = release.noise_multiplier * release.sensitivity  # sigma, up to float rounding
    direct = pld.from_discrete_gaussian_mechanism(lattice_sigma, value_discretization_interval=1e-4)
    expected = direct.self_compose(units * count).get_epsilon_for_delta(1e-5)
    assert ledger.epsilon("pld") == pytest.approx(expected, rel=1e-9)
    # RDP: the zCDP guarantee rho = units / (2 sigma^2) per release, as dp-accounting's ZCDpEvent.
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dp_accounting.ZCDpEvent(rho=units / (2 * lattice_sigma**2)), count)
    assert ledger.epsilon("rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)


def test_discrete_gaussian_is_close_to_the_gaussian_above_sigma_one_and_differs_below():
    def eps(sigma, mechanism):
        kw = dict(unit_changes=1) if mechanism == "discrete_gaussian" else {}
        r = Release(iteration=1, noise_multiplier=sigma, mechanism=mechanism, count=10, **kw)
        return PrivacyLedger(delta=1e-5, releases=[r]).epsilon("pld")

    assert eps(7.07, "discrete_gaussian") == pytest.approx(eps(7.07, "gaussian"), rel=2e-3)

    def one(
        sigma, mechanism
    ):  # a single release: sigma 0.4 is above accounting's noise floor of 0.2
        kw = dict(unit_changes=1) if mechanism == "discrete_gaussian" else {}
        r = Release(iteration=1, noise_multiplier=sigma, mechanism=mechanism, **kw)
        return PrivacyLedger(delta=1e-5, releases=[r]).epsilon("pld")

    assert abs(one(0.4, "discrete_gaussian") - one(0.4, "gaussian")) > 0.05 * one(0.4, "gaussian")


def test_user_level_discrete_gaussian_is_rdp_only():
    r = Release(
        iteration=1,
        noise_multiplier=3.0,
        sensitivity=2.0**16,
        neighboring_relation="add_or_remove_one_group",
        mechanism="discrete_gaussian",
    )
    ledger = PrivacyLedger(delta=1e-5, releases=[r])
    assert set(ledger.epsilons()) == {"rdp", "gaussian"}
    with pytest.raises(dp_accounting.UnsupportedEventError, match="use accountant='rdp'"):
        ledger.epsilon("pld")
    # zCDP of sigma / sensitivity = 3: the same RDP epsilon as a Gaussian of multiplier 3.
    gauss = PrivacyLedger(delta=1e-5, releases=[Release(iteration=1, noise_multiplier=3.0)])
    assert ledger.epsilon("rdp") == pytest.approx(gauss.epsilon("rdp"), rel=1e-9)


def test_replace_one_is_told_to_dp_accounting_and_mixing_is_refused():
    r = Release(
        iteration=1,
        noise_multiplier=3.0 / np.sqrt(2),
        sensitivity=np.sqrt(2),
        neighboring_relation="replace_one_sample",
        mechanism="discrete_gaussian",
        unit_changes=2,
    )
    ledger = PrivacyLedger(delta=1e-5, releases=[r])
    add = Release(iteration=1, noise_multiplier=3.0, mechanism="discrete_gaussian", unit_changes=1)
    assert ledger.epsilon("pld") > PrivacyLedger(delta=1e-5, releases=[add]).epsilon("pld")
    with pytest.raises(ValueError, match="one kind of neighbouring relation"):
        ledger.record(dataclasses.replace(add, iteration=2))


def test_discrete_release_validation():
    with pytest.raises(ValueError, match="only meaningful for mechanism='discrete_gaussian'"):
        Release(iteration=1, noise_multiplier=1.0, unit_changes=1)
    with pytest.raises(ValueError, match=r"has L2 sensitivity sqrt\(4\)"):
        Release(iteration=1, noise_multiplier=1.0, mechanism="discrete_gaussian", unit_changes=4)
    with pytest.raises(ValueError, match="mechanism must be one of"):
        Release(iteration=1, noise_multiplier=1.0, mechanism="laplace")
    with pytest.raises(ValueError, match="neighboring_relation must be one of"):
        Release(iteration=1, noise_multiplier=1.0, neighboring_relation="swap")
