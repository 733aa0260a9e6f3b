"""Training-data attribution for PRISM and dense models (see docs/attribution.md).

Methods, one module each: `prototype` (single forward pass over the prototype index),
`influence` (influence function restricted to the prototype head, per-prototype solves),
and post-hoc baselines `graddot` (TracIn, one checkpoint), `trak` (random projections +
Gauss-Newton inverse) and `ekfac` (Kronecker-factored, eigenvalue-corrected influence).
`index` writes/reads the on-disk prototype index; `lds` scores methods by the linear
datamodeling score.
"""
