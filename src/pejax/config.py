"""Run configuration: frozen, keyword-only dataclasses validated on construction.

Settings that change the privacy guarantee (:class:`PrivacyConfig`) are kept apart from the algorithm's
hyperparameters (:class:`PEConfig`) and from speed settings (:class:`SpeedConfig`, which never change the
mechanism). ``RunConfig`` groups them and loads from TOML or YAML with unknown keys refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import numpy as np

from pejax import _validate
from pejax.accounting import ACCOUNTANTS
from pejax.accounting import _check_delta_range
from pejax.accounting import _check_epsilon_range
from pejax.mechanism import SELECTION_MODES
from pejax.neighbors import BACKENDS
from pejax.neighbors import METRICS
from pejax.neighbors import PRECISIONS

NEIGHBORING = ("add_remove", "replace_one")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """What the run may spend.

    Attributes:
      epsilon: target epsilon (> 0). Alone, the noise is calibrated to it; with ``noise_multiplier``, it is a
        budget that the run refuses to exceed. ``None``: no budget (``noise_multiplier`` required).
      delta: target delta in (0, 1). ``None``: ``1 / (N ln N)`` for the public bound ``max_private_samples`` N
        (add/remove adjacency), or ``1 / (n ln n)`` for the public n (replace-one); never from a private n.
      noise_multiplier: fixed noise multiplier of the vote histograms; 0 means no privacy at all (for
        experiments only: the report then says epsilon = inf).
      accountant: accountant used to calibrate and to enforce the budget: ``"pld"`` (exact for the discrete
        Gaussian releases of sample-level runs; the default there) or ``"rdp"`` (zCDP; the default and the only
        choice at user level, whose snapped real-valued votes have no exact PLD here). The report shows every
        accountant that applies (and the continuous-Gaussian closed form as a cross-check).
      class_proportions: public class proportions (one per class, summing to 1) used to split synthetic
        samples over classes. ``None`` (default) estimates them from the private data with the Gaussian
        mechanism, spending ``class_count_budget`` of the budget (recorded in the ledger).
      class_count_budget: the share of the privacy budget (as a share of the total squared Gaussian-DP mu,
        i.e. of the precision 1/sigma^2) spent on the class counts, in (0, 1).
      user_level: whether ``group_ids`` are given and the unit of privacy is one user instead of one sample.
      neighboring: the neighbouring relation the guarantee is stated for. ``"add_remove"`` (default): data sets
        differ by one sample (or user) added or removed, so the number n of private samples is itself private:
        ``delta`` must then be given, or derived from the public bound ``max_private_samples``, never from n.
        ``"replace_one"``: n is public and one sample (or user) is swapped for another, possibly of another
        class; a swap moves two histograms and two class counts, and is accounted as such (L2 sensitivity
        sqrt(2)).
      max_private_samples: a public upper bound N on n (e.g. the size of the population the data are drawn
        from); with ``neighboring="add_remove"`` and no ``delta``, delta is 1 / (N ln N). A run with n > N stops.
      noise_seed: ``None`` (default): the DP noise is drawn with a fresh secret key from the operating system's
        entropy. An integer makes the noise reproducible for research: such a run is NOT a differentially
        private release (anyone who knows the seed can subtract the noise), and every output says so.
    """

    epsilon: float | None = 1.0
    delta: float | None = None
    noise_multiplier: float | None = None
    accountant: str | None = None
    class_proportions: tuple[float, ...] | None = None
    class_count_budget: float = 0.05
    user_level: bool = False
    neighboring: str = "add_remove"
    max_private_samples: int | None = None
    noise_seed: int | None = None

    def __post_init__(self):
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "give privacy.epsilon (a target to calibrate the noise to) or privacy.noise_multiplier (a "
                "fixed noise; with epsilon too, epsilon is then a budget the run must not exceed)."
            )
        if self.epsilon is not None:
            _check_epsilon_range(
                _validate.epsilon(self.epsilon, "privacy.epsilon"), "privacy.epsilon"
            )
        if self.noise_multiplier is not None:
            _validate.finite_float("privacy.noise_multiplier", self.noise_multiplier, minimum=0.0)
        if self.delta is not None:
            _check_delta_range(_validate.delta(self.delta, "privacy.delta"), "privacy.delta")
        if self.accountant is None:
            object.__setattr__(self, "accountant", "rdp" if self.user_level else "pld")
        _validate.one_of("privacy.accountant", self.accountant, ACCOUNTANTS)
        if self.accountant == "gaussian":
            raise ValueError(
                "privacy.accountant='gaussian' is the closed form of the continuous Gaussian mechanism, but runs "
                "release the discrete Gaussian (see pejax.secure_noise); use 'pld' (exact) or 'rdp'."
            )
        if self.user_level and self.accountant == "pld":
            raise ValueError(
                "privacy.accountant='pld' cannot account user-level runs: their votes are real-valued, snapped to "
                "a 2^-16 grid, and only the discrete Gaussian's zCDP bound applies. Use privacy.accountant = "
                "'rdp' (the user-level default)."
            )
        _validate.one_of("privacy.neighboring", self.neighboring, NEIGHBORING)
        if self.max_private_samples is not None:
            _validate.positive_int(
                "privacy.max_private_samples", self.max_private_samples, minimum=2
            )
        if self.noise_seed is not None:
            if isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int):
                raise TypeError(
                    f"privacy.noise_seed must be an integer or absent, got {self.noise_seed!r}."
                )
        frac = _validate.finite_float("privacy.class_count_budget", self.class_count_budget)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"privacy.class_count_budget must lie in (0, 1), got {frac}.")
        if self.class_proportions is not None:
            props = tuple(float(p) for p in self.class_proportions)
            if any(not math.isfinite(p) or p <= 0 for p in props) or abs(sum(props) - 1.0) > 1e-6:
                raise ValueError(
                    "privacy.class_proportions must be positive numbers summing to 1 (public "
                    f"proportions, one per class), got {self.class_proportions!r}."
                )
            object.__setattr__(self, "class_proportions", props)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PEConfig:
    """The algorithm's hyperparameters (chosen on public data; they do not change the privacy analysis).

    Attributes:
      num_classes: number of classes; private labels must lie in [0, num_classes).
      samples_per_iteration: synthetic candidates per iteration over all classes (split by class proportions).
      iterations: number of noisy histogram releases T.
      k: each private sample votes for its k nearest candidates.
      metric: ``"l2"``, ``"cosine"`` or ``"ip"``.
      lookahead_degree: L; a candidate's embedding is the mean embedding of L variations of it (0: itself).
      threshold_sigmas: bins below ``threshold_sigmas * noise_multiplier`` votes are dropped after the noise.
      selection_mode: ``"sample"`` (proportional, with replacement) or ``"rank"`` (top bins).
      keep_selected: keep the selected parents in the next population (the rest are their variations).
      variation_folds: variations made from each parent; parents = candidates / folds per class.
      degrees: variation degree per iteration 1..T (the generator's own scale), or two numbers
        ``(first, last)`` interpolated geometrically.
      output: ``"parents"`` (the last iteration's selected parents plus ``final_variations`` variations each)
        or ``"population"`` (fresh variations of the last parents).
      final_samples_per_class: size of the released synthetic set per class (``None``: as many as the
        candidates of that class).
      final_degree: variation degree of the extra samples made from the final parents (post-processing).
      min_samples_per_class: lower bound on candidates per class whatever the class proportions.
    """

    num_classes: int
    samples_per_iteration: int = 200
    iterations: int = 5
    k: int = 1
    metric: str = "l2"
    lookahead_degree: int = 0
    threshold_sigmas: float = 1.0
    selection_mode: str = "sample"
    keep_selected: bool = False
    variation_folds: int = 1
    degrees: tuple[float, ...] = (0.8, 0.2)
    output: str = "parents"
    final_samples_per_class: int | None = None
    final_degree: float = 0.1
    min_samples_per_class: int = 4

    def __post_init__(self):
        _validate.positive_int("pe.num_classes", self.num_classes)
        _validate.positive_int("pe.samples_per_iteration", self.samples_per_iteration)
        _validate.positive_int("pe.iterations", self.iterations)
        _validate.positive_int("pe.k", self.k)
        _validate.one_of("pe.metric", self.metric, METRICS)
        _validate.positive_int("pe.lookahead_degree", self.lookahead_degree, minimum=0)
        _validate.finite_float("pe.threshold_sigmas", self.threshold_sigmas, minimum=0.0)
        _validate.one_of("pe.selection_mode", self.selection_mode, SELECTION_MODES)
        _validate.positive_int("pe.variation_folds", self.variation_folds)
        _validate.one_of("pe.output", self.output, ("parents", "population"))
        _validate.finite_float("pe.final_degree", self.final_degree, minimum=0.0)
        _validate.positive_int("pe.min_samples_per_class", self.min_samples_per_class)
        if self.final_samples_per_class is not None:
            _validate.positive_int("pe.final_samples_per_class", self.final_samples_per_class)
        if isinstance(self.degrees, str | bytes) or not isinstance(
            self.degrees, list | tuple | np.ndarray
        ):
            raise TypeError(
                f"pe.degrees must be a list of numbers, 2 (first, last) or one per iteration, got "
                f"{self.degrees!r} of type {type(self.degrees).__name__}; write e.g. degrees = [0.5, 0.1]."
            )
        degrees = tuple(
            _validate.finite_float("pe.degrees", d, minimum=0.0) for d in tuple(self.degrees)
        )
        if len(degrees) not in (2, self.iterations) or not degrees:
            raise ValueError(
                f"pe.degrees must hold 2 numbers (first, last) or one per iteration ({self.iterations}), "
                f"got {self.degrees!r}."
            )
        object.__setattr__(self, "degrees", degrees)
        if self.min_samples_per_class < self.k:
            raise ValueError(
                f"pe.min_samples_per_class ({self.min_samples_per_class}) must be >= pe.k ({self.k}): "
                "every class needs at least k candidates to vote for."
            )
        if self.samples_per_iteration < self.num_classes * self.min_samples_per_class:
            raise ValueError(
                f"pe.samples_per_iteration ({self.samples_per_iteration}) is too small for "
                f"{self.num_classes} classes with at least {self.min_samples_per_class} samples each; "
                f"use at least {self.num_classes * self.min_samples_per_class}."
            )

    def degree(self, iteration: int) -> float:
        """Variation degree used after the selection of ``iteration`` (1-based)."""
        if len(self.degrees) == self.iterations:
            return self.degrees[iteration - 1]
        first, last = self.degrees
        if self.iterations == 1 or first == last:
            return first
        frac = (iteration - 1) / (self.iterations - 1)
        if first > 0 and last > 0:
            return float(first * (last / first) ** frac)
        return float(first + (last - first) * frac)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    """Speed settings: they change how fast a run goes, never what it computes or its privacy.

    Attributes:
      block_size: private samples per nearest-neighbour block (``None``: automatic).
      precision: matmul precision of the votes, as in :func:`pejax.vote_histogram`: ``"highest"``
        (float32, default), ``"high"``, ``"default"``, or ``"bfloat16"`` (bfloat16 matmuls with an exact
        float32 re-check; for GPUs and TPUs; not with a device mesh).
      backend: the exact nearest-neighbour search of the votes: ``"xla"`` (default, any device), ``"blas"``
        (the platform BLAS through NumPy, on the CPU) or ``"faiss"`` (faiss-cpu, extra ``pejax[faiss]``); the
        last two need CPU embeddings, ``precision = "highest"`` and no device mesh. Same votes up to float32
        near-ties.
      generator_retries: times a failing generator call is retried before the run stops.
      retry_backoff_s: first wait between retries in seconds (doubles after each failure).
      devices: vote over a device mesh: a device count (a 1-D mesh) or a mesh shape such as ``[2, 4]``
        (``None``: one device). The votes are the same on any mesh.
      private_stream: path of a ``.npy`` file of private embeddings (one row per private sample, in the
        data's order), streamed in chunks instead of embedding the private data in memory.
    """

    block_size: int | None = None
    precision: str = "highest"
    backend: str = "xla"
    generator_retries: int = 2
    retry_backoff_s: float = 0.5
    devices: int | tuple[int, ...] | None = None
    private_stream: str | None = None

    def __post_init__(self):
        if self.block_size is not None:
            _validate.positive_int("speed.block_size", self.block_size)
        _validate.one_of("speed.precision", self.precision, PRECISIONS)
        _validate.one_of("speed.backend", self.backend, BACKENDS)
        if self.backend != "xla" and self.precision != "highest":
            raise ValueError(
                f"speed.backend={self.backend!r} computes in float32: it needs speed.precision='highest', got "
                f"{self.precision!r}. Use backend 'xla' for reduced-precision matmuls on GPUs and TPUs."
            )
        _validate.positive_int("speed.generator_retries", self.generator_retries, minimum=0)
        _validate.finite_float("speed.retry_backoff_s", self.retry_backoff_s, minimum=0.0)
        if self.devices is not None:
            shape = (self.devices,) if isinstance(self.devices, int | bool) else self.devices
            if (
                not isinstance(shape, tuple | list)
                or not shape
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
            ):
                raise ValueError(
                    "speed.devices must be a device count >= 1 or a mesh shape of such counts (e.g. "
                    f"[2, 4]), got {self.devices!r}."
                )
            object.__setattr__(
                self, "devices", shape[0] if isinstance(self.devices, int) else tuple(shape)
            )
            if self.backend != "xla":
                raise ValueError(
                    f"speed.backend={self.backend!r} searches on the host CPU and cannot vote over a device "
                    f"mesh (speed.devices={self.devices!r}). Use backend 'xla' with a mesh, or drop devices."
                )
        if self.private_stream is not None:
            if not isinstance(self.private_stream, str | pathlib.PurePath):
                raise TypeError(
                    "speed.private_stream must be the path of a .npy file of private embeddings, got "
                    f"{self.private_stream!r}."
                )
            object.__setattr__(self, "private_stream", str(self.private_stream))


def _build(cls, section: str, values: Any):
    fields = {f.name for f in dataclasses.fields(cls)}
    values = _validate.known_keys(f"config section [{section}]", values, fields)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if required:
        raise ValueError(
            f"config section [{section}] needs {', '.join(f'{section}.{k}' for k in required)}"
            + (
                " (the number of classes of the private data)"
                if required == ["num_classes"]
                else ""
            )
            + f"; add {required[0]} = ... under [{section}]."
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


SECTIONS = ("privacy", "pe", "speed", "data", "generator", "embedding", "evaluation", "run")


def load_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict, refusing unknown sections."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"config file {str(path)!r} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
            "give a TOML or YAML text file."
        ) from None
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "reading YAML configs needs PyYAML: pip install 'pejax[demo]'."
            ) from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    else:
        raise ValueError(f"config file {str(path)!r} must end in .toml, .yaml or .yml.")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of sections.")
    check_sections(data, f"config file {str(path)!r}")
    return data


def check_sections(config: dict, where: str = "the config") -> None:
    """Refuses unknown top-level sections, with a did-you-mean hint."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        hints = ", ".join(f"[{k}]{_validate.did_you_mean(k, SECTIONS)}" for k in unknown)
        raise ValueError(
            f"unknown section(s) {hints} in {where}; valid sections: {', '.join(SECTIONS)}."
        )


def privacy_from_dict(values) -> PrivacyConfig:
    """Builds the ``[privacy]`` section; epsilon and delta must also lie in the range pejax accounts for."""
    from pejax import accounting

    privacy = _build(PrivacyConfig, "privacy", values)
    if privacy.epsilon is not None:
        accounting._check_epsilon_range(privacy.epsilon, "privacy.epsilon")
    if privacy.delta is not None:
        accounting._check_delta_range(privacy.delta, "privacy.delta")
    return privacy


def pe_from_dict(values) -> PEConfig:
    return _build(PEConfig, "pe", values)


def speed_from_dict(values) -> SpeedConfig:
    return _build(SpeedConfig, "speed", values)


# Keys of the free-form sections that hold one path, or a list of paths.
PATH_KEYS = {("data", "path"), ("data", "test_path")}
PATH_LIST_KEYS = {("generator", "fonts")}


def _check_path(name: str, value: Any, example: str) -> None:
    if not isinstance(value, str | os.PathLike):
        raise TypeError(
            f"{name} must be a path (a string), got {value!r} of type {type(value).__name__}; write e.g. "
            f"{example}."
        )


def check_keys(section: str, values: dict | None, allowed: tuple[str, ...]) -> dict:
    """Refuses keys outside ``allowed`` in a free-form config section (data, generator, embedding, run).

    Also checks that path keys (``data.path``, ``data.test_path``) hold one path and list-of-path keys
    (``generator.fonts``) a list of paths.
    """
    values = _validate.known_keys(f"config section [{section}]", values, allowed)
    for key, value in values.items():
        if (section, key) in PATH_KEYS:
            _check_path(f"{section}.{key}", value, f'{key} = "data/train.npz"')
        elif (section, key) in PATH_LIST_KEYS:
            check_path_list(f"{section}.{key}", value)
    return values


def check_path_list(name: str, value: Any) -> None:
    """Checks that ``value`` is a list of paths (e.g. ``generator.fonts``), naming the bad item."""
    key = name.rsplit(".", 1)[-1]
    if isinstance(value, str | os.PathLike) or not isinstance(value, list | tuple):
        raise TypeError(
            f"{name} must be a list of paths, got {value!r}; write e.g. "
            f'{key} = ["fonts/a.ttf", "fonts/b.ttf"].'
        )
    for i, item in enumerate(value):
        _check_path(f"{name}[{i}]", item, f'{key} = ["fonts/a.ttf"]')


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
