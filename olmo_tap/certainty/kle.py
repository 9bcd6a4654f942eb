"""Kernel Language Entropy (Nikitin et al. 2024) of N sampled answers, as the original system computes it.

From an N x N semantic similarity matrix ``W`` (``W[i, j]`` in [0, 2]: the sum of the two directions' scores,
each in [0, 1]; see ``olmo_tap.certainty.similarity``):

1. ``W`` is made symmetric, ``(W + W.T) / 2``, clipped to [0, 2], its diagonal set to 0 (self-similarity cancels
   in the Laplacian anyway);
2. the graph Laplacian ``L = D - W`` with ``D = diag(W.sum(1))`` (unnormalised);
3. the heat kernel ``K = exp(-t L)`` with ``t = KERNEL_T = 1.0`` (the original's lengthscale). ``L`` is real
   symmetric, so ``K = V diag(exp(-t lambda)) V^T`` from its eigendecomposition: symmetric and positive
   *definite* by construction (every eigenvalue ``exp(-t lambda) > 0``), no projection needed;
4. unit diagonal, ``K~[i, j] = K[i, j] / sqrt(K[i, i] K[j, j])``, then the density matrix ``rho = K~ / N``
   (trace 1, positive semi-definite);
5. the von Neumann entropy ``H = -sum(l log l)`` over ``rho``'s eigenvalues above ``EIGEN_FLOOR`` (nats);
6. certainty ``1 - H / log N``, clipped to [0, 1] (``H`` is at most ``log N``, reached when no two answers
   share anything: ``W = 0`` gives ``rho = I / N``). N identical answers (``W = 2`` off the diagonal) leave
   ``e^{-2N t}`` of the other directions in the kernel: certainty 0.9988 for the default N = 5 (0.87 for N = 2).

Everything runs in float64 on the CPU (N is 5 by default: microseconds), so the value is the same on every
machine to within float64 rounding, and an audit recomputes it from the recorded matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

KERNEL_T = 1.0  # heat-kernel time (lengthscale): the original's KLE_HEAT_KERNEL_T
N_SAMPLES = 5  # sampled answers per certainty: the original's KLE_N_SAMPLES
EIGEN_FLOOR = 1e-10  # eigenvalues below this are rounding noise of zero (0 log 0 = 0)
MAX_SIMILARITY = 2.0  # both directions' scores at 1


def check_similarity(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """``matrix`` as a float64 array after checking it: square, N >= 2, finite, within [0, 2] (1e-6 slack)."""
    w = np.asarray(matrix, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"the similarity matrix must be square, got shape {tuple(w.shape)}")
    if w.shape[0] < 2:
        raise ValueError(f"Kernel Language Entropy needs at least 2 answers, got {w.shape[0]}")
    if not np.isfinite(w).all():
        raise ValueError("the similarity matrix has a non-finite entry")
    if w.min() < -1e-6 or w.max() > MAX_SIMILARITY + 1e-6:
        raise ValueError(f"similarities must lie in [0, {MAX_SIMILARITY:g}], got [{w.min():.3g}, {w.max():.3g}]")
    return w


def density_matrix(matrix: Sequence[Sequence[float]] | np.ndarray, t: float = KERNEL_T) -> np.ndarray:
    """Steps 1-4: the unit-trace density matrix of the heat kernel of ``matrix``'s graph."""
    if not t > 0:
        raise ValueError(f"the heat-kernel time t must be > 0, got {t}")
    w = check_similarity(matrix)
    w = np.clip((w + w.T) / 2, 0.0, MAX_SIMILARITY)
    np.fill_diagonal(w, 0.0)
    laplacian = np.diag(w.sum(axis=1)) - w
    eigenvalues, vectors = np.linalg.eigh(laplacian)
    kernel = (vectors * np.exp(-t * eigenvalues)) @ vectors.T
    scale = np.sqrt(np.diag(kernel))
    return kernel / np.outer(scale, scale) / w.shape[0]


def von_neumann_entropy(rho: np.ndarray) -> float:
    """``-tr(rho log rho)`` in nats (step 5)."""
    eigenvalues = np.linalg.eigvalsh(rho)
    eigenvalues = eigenvalues[eigenvalues > EIGEN_FLOOR]
    return float(-(eigenvalues * np.log(eigenvalues)).sum())


def kernel_language_entropy(matrix: Sequence[Sequence[float]] | np.ndarray, t: float = KERNEL_T) -> float:
    """KLE in nats of the answers whose similarities are ``matrix``: between 0 and log N."""
    return von_neumann_entropy(density_matrix(matrix, t))


def kle_certainty(entropy: float, n: int) -> float:
    """Step 6: ``1 - entropy / log n`` within [0, 1] (the clip absorbs rounding at the log n ceiling)."""
    if n < 2:
        raise ValueError(f"certainty needs at least 2 answers, got {n}")
    return min(1.0, max(0.0, 1.0 - entropy / math.log(n)))
