"""Quality metrics for synthetic images: Frechet distance, downstream classification accuracy, and the
nearest-of-N coverage oracle of a generator's random samples.

These run on the host after a run (or in a callback). They are *evaluation* tools: a metric
computed on private data and then used to steer a run or to choose hyperparameters spends privacy
that pejax does not account.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from pejax import _validate
from pejax import embeddings as _embeddings


def _check_embeddings(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of embeddings (num_samples, dim), got shape {x.shape}. "
            "Embed images first, e.g. pixel_embedding(images)."
        )
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    ):
        raise TypeError(f"{name} must have a real numeric dtype, got {x.dtype}.")
    if x.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 samples to estimate a covariance, got shape {x.shape}."
        )
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one dimension, got shape {x.shape}.")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))
        raise ValueError(
            f"{name} contains NaN or Inf ({len(bad)} entries, first in row {int(bad[0][0])}). "
            "Drop or repair those rows."
        )
    return x


@jax.jit
def _frechet(x: jax.Array, y: jax.Array) -> jax.Array:
    n1, d = x.shape
    n2 = y.shape[0]
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    diff = mu1 - mu2
    if n1 * n2 <= d * d:
        # Few samples: with S1 = A^T A and S2 = B^T B (A, B the centred rows over sqrt(n - 1)), the non-zero
        # eigenvalues of S1 S2 are those of (B A^T)^T (B A^T), so tr sqrt(S1 S2) is the sum of the singular
        # values of the (n2, n1) matrix B A^T: no (d, d) matrix is formed.
        a = (x - mu1) / jnp.sqrt(n1 - 1.0)
        b = (y - mu2) / jnp.sqrt(n2 - 1.0)
        tr_covmean = jnp.sum(jnp.linalg.svd(b @ a.T, compute_uv=False))
        fd = diff @ diff + jnp.sum(a * a) + jnp.sum(b * b) - 2.0 * tr_covmean
        return jnp.maximum(fd, 0.0)

    def cov(z, mu):
        zc = z - mu
        return zc.T @ zc / (z.shape[0] - 1)

    s1, s2 = cov(x, mu1), cov(y, mu2)
    # sqrt(S1) by symmetric eigendecomposition; round-off negative eigenvalues are clipped at 0.
    w1, v1 = jnp.linalg.eigh(s1)
    sqrt_s1 = (v1 * jnp.sqrt(jnp.clip(w1, 0.0))) @ v1.T
    # tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1)), and the latter matrix is symmetric PSD.
    m = sqrt_s1 @ s2 @ sqrt_s1
    m = (m + m.T) / 2
    tr_covmean = jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(m), 0.0)))
    fd = diff @ diff + jnp.trace(s1) + jnp.trace(s2) - 2.0 * tr_covmean
    return jnp.maximum(fd, 0.0)


def frechet_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Frechet distance between Gaussian fits of two sets of embeddings.

    ``||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr sqrt(S_x S_y)`` with sample means ``mu`` and
    unbiased (``ddof=1``) covariances ``S``, as in FID. With Inception embeddings this is FID; with
    pixel embeddings it is a cheap pixel-space analogue. Units: squared embedding units.

    Precision: always float64, computed in JAX inside a ``jax.enable_x64(True)`` context (scoped
    to this call and restored on exit, so the global ``jax_enable_x64`` flag is unchanged); inputs
    of any real dtype are converted to float64 first. ``tr sqrt(S_x S_y)`` is computed as
    ``sum(sqrt(eigvalsh(sqrt(S_x) S_y sqrt(S_x))))``, with ``sqrt(S_x)`` from a symmetric
    eigendecomposition and negative round-off eigenvalues clipped at 0. When ``N1 * N2 <= D^2``
    (few samples, e.g. 2048-d Inception features of a small set) it is computed instead as the sum
    of the singular values of the (N2, N1) matrix ``Yc Xc^T / sqrt((N1 - 1)(N2 - 1))`` of centred
    rows, which has the same value and forms no (D, D) matrix. Both stay real and well defined for
    singular covariances (fewer samples than dimensions), where ``scipy.linalg.sqrtm`` may return
    complex values. The result is clipped at 0.
    Cost: O((N1 + N2) D^2 + D^3) time and O(D^2) memory, or O(N1 N2 (D + min(N1, N2))) time and
    O(N1 N2) memory on the few-samples path.

    Args:
      x: (N1, D) real array, N1 >= 2, finite.
      y: (N2, D) real array, N2 >= 2, finite, same D.

    Returns:
      The distance as a Python float >= 0 (0 for identical sets, up to round-off); symmetric in
      ``x`` and ``y`` up to round-off.

    Raises:
      ValueError: not 2-D, fewer than 2 samples, mismatched D, NaN or Inf values.
      TypeError: a non-numeric dtype.

    Example:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(100, 3))
      >>> round(frechet_distance(x, x + 2.0), 6)  # only the mean moved: ||(2, 2, 2)||^2
      12.0
    """
    x = _check_embeddings("x", x)
    y = _check_embeddings("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            "x and y must have the same embedding dimension, got "
            f"x.shape={x.shape} and y.shape={y.shape}. Embed both with the same function."
        )
    with jax.enable_x64(True):
        fd = _frechet(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))
        return float(fd)


def _check_labels(name: str, labels: Any, num: int, images_name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"{name} must be integer class ids, got dtype {labels.dtype}. Convert with "
            f"{name}.astype(np.int32) if the values are whole numbers."
        )
    if labels.ndim != 1 or labels.shape[0] != num:
        raise ValueError(
            f"{name} must have shape ({num},), one label per image of {images_name}, "
            f"got shape {labels.shape}."
        )
    return labels


def downstream_accuracy(
    train_images: ArrayLike,
    train_labels: ArrayLike,
    test_images: ArrayLike,
    test_labels: ArrayLike,
    *,
    size: tuple[int, int] = (8, 8),
    value_scale: float = 16.0,
    max_iter: int = 1000,
    C: float = 1.0,
) -> float:
    """Accuracy on real test data of a classifier trained on (synthetic) training data.

    Both image sets are resized to ``size`` with :func:`pejax.embeddings.resize_embedding` (exact
    area averaging when the sides divide, else antialiased linear resizing), flattened and
    multiplied by ``value_scale`` (16 maps [0, 1] to the [0, 16] range of scikit-learn's digits).
    A scikit-learn ``LogisticRegression(C=C, max_iter=max_iter)`` (lbfgs solver, deterministic) is
    fit on the training set and scored on the test set.

    Single-class training set: logistic regression cannot be fit, so the classifier predicts that
    one class for every test image: the function returns the fraction of test labels equal to it
    and issues a ``UserWarning``. A synthetic set that collapsed to one class then scores like a
    constant guess instead of crashing an evaluation.

    Args:
      train_images: (N1, H1, W1, C) floating images in [0, 1] (usually synthetic).
      train_labels: (N1,) integer class ids.
      test_images: (N2, H2, W2, C) floating images in [0, 1] (usually real, held out), same C.
      test_labels: (N2,) integer class ids.
      size: ``(height, width)`` the images are resized to before classification.
      value_scale: factor applied to pixel values in [0, 1]; must be > 0.
      max_iter: iteration limit of the lbfgs solver.
      C: inverse L2 regularisation strength, > 0 (scikit-learn's default 1.0). Fix it once per data
        set, never on the test images: :func:`choose_classifier_c` picks it by cross-validation on a
        real training split (for the digits demo: 0.01).

    Returns:
      Test accuracy in [0, 1] as a Python float.

    Raises:
      ValueError: bad images, label counts that do not match the images, a channel mismatch, a
        bad size or value_scale.
      TypeError: non-integer labels, non-floating images.
      ImportError: scikit-learn is not installed (``pip install 'pejax[demo]'``).

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> labels = np.arange(40) % 2
      >>> images = rng.uniform(0.0, 0.2, (40, 8, 8, 1)).astype(np.float32)
      >>> images[labels == 1, :4] += 0.7  # class 1: bright top half
      >>> downstream_accuracy(images[:20], labels[:20], images[20:], labels[20:])
      1.0
    """
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "downstream_accuracy needs scikit-learn; install it with pip install 'pejax[demo]'."
        ) from e

    value_scale = _validate.finite_float("value_scale", value_scale, minimum=0.0, strict=True)
    max_iter = _validate.positive_int("max_iter", max_iter)
    C = _validate.finite_float("C", C, minimum=0.0, strict=True)
    train_images = _embeddings.check_images("train_images", train_images)
    test_images = _embeddings.check_images("test_images", test_images)
    if train_images.shape[-1] != test_images.shape[-1]:
        raise ValueError(
            "train_images and test_images must have the same number of channels, got shapes "
            f"{tuple(train_images.shape)} and {tuple(test_images.shape)}. Convert one side, "
            "e.g. to grey with resize_embedding's channels=1 rule (luma weights)."
        )
    n_train, n_test = train_images.shape[0], test_images.shape[0]
    train_labels = _check_labels("train_labels", train_labels, n_train, "train_images")
    test_labels = _check_labels("test_labels", test_labels, n_test, "test_images")

    x_train = _embeddings.resize_embedding(train_images, size=size)
    x_test = _embeddings.resize_embedding(test_images, size=size)
    x_train = np.asarray(x_train, np.float64) * value_scale
    x_test = np.asarray(x_test, np.float64) * value_scale

    classes = np.unique(train_labels)
    if classes.size == 1:
        warnings.warn(
            f"train_labels has a single class ({int(classes[0])}); no classifier can be "
            "trained, so the accuracy of always predicting that class is returned.",
            UserWarning,
            stacklevel=2,
        )
        return float(np.mean(test_labels == classes[0]))

    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # One BLAS thread: with JAX's own threads busy, a multi-threaded BLAS was seen running ~100x slower here.
    with threadpool_limits(1):
        clf = LogisticRegression(C=C, max_iter=max_iter)
        clf.fit(x_train, train_labels)
        return float(clf.score(x_test, test_labels))


# Candidate values of C for choose_classifier_c: a log grid around scikit-learn's default 1.0.
DEFAULT_C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


def choose_classifier_c(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    grid: tuple[float, ...] = DEFAULT_C_GRID,
    folds: int = 5,
    size: tuple[int, int] = (8, 8),
    value_scale: float = 16.0,
    max_iter: int = 5000,
) -> tuple[float, dict[float, float]]:
    """Chooses the logistic regression's ``C`` for :func:`downstream_accuracy` by cross-validation.

    The evaluation classifier is part of the evaluation protocol: choose its regularisation once per
    data set on a real *training* split (never on the test images, and never on a private set whose
    report must stay private), then score every synthetic set with that fixed ``C``. Images are
    prepared exactly as :func:`downstream_accuracy` does; each ``C`` of ``grid`` is scored by the mean
    accuracy of ``folds``-fold stratified cross-validation (scikit-learn, unshuffled folds)
    and keeps the smallest ``C`` of best mean accuracy.

    Args:
      images: (N, H, W, C) floating images in [0, 1].
      labels: (N,) integer class ids; every class needs at least ``folds`` images.
      grid: candidate values of C (> 0).
      folds: number of cross-validation folds, >= 2.
      size, value_scale, max_iter: as in :func:`downstream_accuracy`.

    Returns:
      ``(C, scores)``: the chosen C and the mean cross-validated accuracy of every C in ``grid``.

    Raises:
      ValueError: bad images or labels, a non-positive C in the grid, too few images per class.
    """
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold
        from sklearn.model_selection import cross_val_score
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "choose_classifier_c needs scikit-learn; install it with pip install 'pejax[demo]'."
        ) from e

    folds = _validate.positive_int("folds", folds, minimum=2)
    grid = tuple(_validate.finite_float("grid[i]", c, minimum=0.0, strict=True) for c in grid)
    if not grid:
        raise ValueError("grid must hold at least one value of C, e.g. (0.01, 0.1, 1.0).")
    images = _embeddings.check_images("images", images)
    labels = _check_labels("labels", labels, images.shape[0], "images")
    _, per_class = np.unique(labels, return_counts=True)
    if per_class.size < 2 or per_class.min() < folds:
        raise ValueError(
            f"choose_classifier_c needs at least 2 classes with >= folds={folds} images each, got "
            f"class sizes {per_class.tolist()}. Use fewer folds or more images."
        )
    x = np.asarray(_embeddings.resize_embedding(images, size=size), np.float64) * value_scale
    from threadpoolctl import threadpool_limits

    ordered = tuple(sorted(grid))
    splits = StratifiedKFold(n_splits=folds)  # no shuffling: the same folds on every call
    with threadpool_limits(1):
        mean = [
            cross_val_score(LogisticRegression(C=c, max_iter=max_iter), x, labels, cv=splits).mean()
            for c in ordered
        ]
    best = float(ordered[int(np.argmax(mean))])  # argmax keeps the first (smallest) C on ties
    return best, {c: float(v) for c, v in zip(ordered, mean, strict=True)}


def nearest_random_samples(
    generator: Any,
    key: jax.Array,
    private: ArrayLike,
    *,
    label: int,
    num_random: int,
    embed: Any,
    batch: int = 5000,
) -> np.ndarray:
    """The nearest-of-N coverage oracle: how well a generator's RANDOM API alone covers the private data.

    Draws ``num_random`` random samples of class ``label`` from ``generator`` (in calls of at most ``batch``
    samples; the call starting at sample ``s`` uses ``fold_in(key, s)``), embeds their images with ``embed``
    and returns, for each private embedding, the nearest (L2) of those sample embeddings. Training a classifier
    on the result bounds what PE's selection could extract from the generator without variations.

    It reads the private data without noise: a developer's tool, outside any DP guarantee.

    Args:
      generator: an image generator (``random`` and ``to_images``; see :class:`pejax.generators.Generator`).
      key: a ``jax.random`` key.
      private: (n, d) float embeddings of the private samples of class ``label``.
      label: the class to draw.
      num_random: how many random samples to draw, >= 1.
      embed: a function from images (m, H, W, C) to (m, d) embeddings (the one that made ``private``).
      batch: random samples per generator call, >= 1.

    Returns:
      (n, d) float32 NumPy array: row i is the sample embedding nearest to ``private[i]``.

    Raises:
      ValueError, TypeError: a bad argument, or embeddings of another width than ``private``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> class Grey:  # samples are grey levels, rendered as 2x2 images
      ...     name, modality = "grey", "image"
      ...     def random(self, key, label, n):
      ...         return jax.random.uniform(key, (n,))
      ...     def to_images(self, s):
      ...         return jnp.broadcast_to(s[:, None, None, None], (len(s), 2, 2, 1))
      >>> private = np.full((3, 4), 0.5, np.float32)
      >>> near = nearest_random_samples(Grey(), jax.random.key(0), private, label=0, num_random=500,
      ...                               embed=lambda im: im.reshape(len(im), -1))
      >>> near.shape, bool(np.abs(near - 0.5).max() < 0.01)
      ((3, 4), True)
    """
    _validate.check_key(key)
    if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 0:
        raise ValueError(f"label must be a class index >= 0, got {label!r}.")
    num_random = _validate.positive_int("num_random", num_random)
    batch = _validate.positive_int("batch", batch)
    if not callable(embed):
        raise TypeError(
            f"embed must be a function from images to embeddings, got {type(embed).__name__}."
        )
    flat = np.asarray(_validate.matrix("private", private), np.float32)
    from pejax.neighbors import nearest_neighbors

    best_d = np.full(len(flat), np.inf)
    best = np.zeros_like(flat)
    for start in range(0, num_random, batch):
        size = min(batch, num_random - start)
        samples = generator.random(jax.random.fold_in(key, start), int(label), size)
        emb = np.asarray(embed(generator.to_images(samples)), np.float32)
        if emb.ndim != 2 or emb.shape != (size, flat.shape[1]):
            raise ValueError(
                f"embed must return ({size}, {flat.shape[1]}) embeddings for {size} images (the width of "
                f"private), got shape {emb.shape}."
            )
        nearest = nearest_neighbors(flat, emb, k=1)
        dist = np.asarray(nearest.distances[:, 0])
        idx = np.asarray(nearest.indices[:, 0])
        closer = dist < best_d
        best_d[closer] = dist[closer]
        best[closer] = emb[idx[closer]]
    return best


__all__ = [
    "choose_classifier_c",
    "downstream_accuracy",
    "frechet_distance",
    "nearest_random_samples",
]
