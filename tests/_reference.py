"""Independent NumPy float64 references for the kernels (brute force, no blocking, no JAX)."""

from __future__ import annotations

import collections

import numpy as np


def distances(queries, keys, metric):
    q = np.asarray(queries, np.float64)
    x = np.asarray(keys, np.float64)
    if metric == "l2":
        return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if metric == "cosine":
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        xn = np.linalg.norm(x, axis=1, keepdims=True)
        qn[qn == 0] = 1.0
        xn[xn == 0] = 1.0
        return 1.0 - (q / qn) @ (x / xn).T
    if metric == "ip":
        return -(q @ x.T)
    raise ValueError(metric)


def knn(queries, keys, k, metric):
    d = distances(queries, keys, metric)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]  # stable: ties to the lowest index
    return np.take_along_axis(d, idx, axis=1), idx, d


def counter_histogram(indices, m, k):
    counts = collections.Counter(int(i) for i in np.asarray(indices).ravel())
    return np.array([counts[j] / np.sqrt(k) for j in range(m)])


def group_histogram(indices, groups, m, k):
    """Dense per-group vote vectors, each scaled to unit L2 norm, summed."""
    groups = np.asarray(groups)
    total = np.zeros(m)
    for g in np.unique(groups):
        v = np.zeros(m)
        for row in np.asarray(indices)[groups == g]:
            v[row] += 1.0 / np.sqrt(k)
        total += v / np.linalg.norm(v)
    return total
