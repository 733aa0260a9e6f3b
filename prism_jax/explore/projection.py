"""A 2-D map of the prototype vectors: UMAP when `umap-learn` is installed, PCA otherwise."""

from __future__ import annotations

import importlib.util

import numpy as np


def pca_2d(x_MxD: np.ndarray) -> np.ndarray:
  """The first two principal components (deterministic signs), [M, 2]."""
  x = np.asarray(x_MxD, np.float64)
  x = x - x.mean(axis=0, keepdims=True)
  if x.shape[0] < 2:
    return np.zeros((x.shape[0], 2))
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  coords = u[:, :2] * s[:2]
  # SVD signs are arbitrary: make the largest-magnitude entry of each axis positive.
  signs = np.sign(coords[np.argmax(np.abs(coords), axis=0), np.arange(coords.shape[1])])
  coords = coords * np.where(signs == 0, 1.0, signs)
  if coords.shape[1] < 2:
    coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
  return coords


def unit_rows(x_MxD: np.ndarray) -> np.ndarray:
  x = np.asarray(x_MxD, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def project(x_MxD: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
  """(coordinates [M, 2], method used). Rows are unit-normalised first (cosine geometry)."""
  x = unit_rows(x_MxD)
  use_umap = method == "umap" or (method == "auto" and importlib.util.find_spec("umap"))
  if use_umap and x.shape[0] > 4:
    import umap  # optional dependency

    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                        n_neighbors=min(15, x.shape[0] - 1))
    return np.asarray(reducer.fit_transform(x), np.float64), "umap"
  return pca_2d(x), "pca"
