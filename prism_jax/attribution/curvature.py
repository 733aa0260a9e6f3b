"""Per-prototype head curvature, stored so a query can apply (G_j + lambda I)^-1 for any lambda.

The Gauss-Newton block of prototype j's value vector U_j, averaged over the N positions,

  G_j = 1/N sum_t a_tj^2 E^T (diag p_t - p_t p_t^T) E = 1/N [E^T diag(Pi_j) E - S_j],

comes from the streamed sums Pi_j = sum_t a_tj^2 p_t and S_j = sum_t a_tj^2 m_t m_t^T
(index_step.py): no per-position V x D work and no stored g_t. The index keeps its
eigendecomposition G_j = Q_j diag(lam_j) Q_j^T (D + D^2 floats per prototype), so any damping
is one product: (G_j + lambda I)^-1 g = Q_j ((Q_j^T g) / (lam_j + lambda)).

At scale (attr.curvature=shared) every prototype shares one basis Q, the eigenvectors of
E^T E (fixed by the parameters, known before the pass), and keeps the diagonal of
Q^T G_j Q, lam_j = [Pi_j (E Q)^2 - Sq_j] / N: D floats per prototype instead of D^2, the
eigenvalue correction of EK-FAC applied per prototype.
"""

from __future__ import annotations

import numpy as np


def blocks(pi_CxV: np.ndarray, s_CxDxD: np.ndarray, e_VxD: np.ndarray, num_tokens: int
           ) -> np.ndarray:
  """G [C, D, D] (float64) of a range of prototypes from their sums."""
  e = np.asarray(e_VxD, np.float64)
  first = np.einsum("cv,vd,ve->cde", np.asarray(pi_CxV, np.float64), e, e, optimize=True)
  g = (first - np.asarray(s_CxDxD, np.float64)) / max(num_tokens, 1)
  return 0.5 * (g + np.swapaxes(g, 1, 2))


def eigen(g_CxDxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(eigenvalues [C, D] >= 0, eigenvectors [C, D, D]) of PSD blocks; rounding's tiny
  negative eigenvalues are clipped to zero (G is PSD in exact arithmetic)."""
  values, vectors = np.linalg.eigh(g_CxDxD)
  return np.maximum(values, 0.0), vectors


def solve(values_D: np.ndarray, vectors_DxD: np.ndarray, g_D: np.ndarray, damping: float
          ) -> np.ndarray:
  """(G + damping I)^-1 g from G's eigendecomposition (float64)."""
  q = np.asarray(vectors_DxD, np.float64)
  return q @ ((q.T @ np.asarray(g_D, np.float64)) / (np.asarray(values_D, np.float64) + damping))


def matrix(values_D: np.ndarray, vectors_DxD: np.ndarray) -> np.ndarray:
  q = np.asarray(vectors_DxD, np.float64)
  return (q * np.asarray(values_D, np.float64)) @ q.T


def shared_basis(e_VxD: np.ndarray) -> np.ndarray:
  """Q [D, D]: eigenvectors of E^T E (float64), the basis every prototype shares."""
  e = np.asarray(e_VxD, np.float64)
  return np.linalg.eigh(e.T @ e)[1]


def shared_values(pi_CxV: np.ndarray, sq_CxD: np.ndarray, e_VxD: np.ndarray, basis_DxD,
                  num_tokens: int) -> np.ndarray:
  """diag(Q^T G_j Q) [C, D] for a range of prototypes (clipped at zero)."""
  eq2 = np.square(np.asarray(e_VxD, np.float64) @ np.asarray(basis_DxD, np.float64))
  values = (np.asarray(pi_CxV, np.float64) @ eq2 - np.asarray(sq_CxD, np.float64))
  return np.maximum(values / max(num_tokens, 1), 0.0)
