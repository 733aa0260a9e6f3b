"""Linear prototype controllers and targeted prototype suppression (docs/control_explore.md).

The command is prism_jax/main/control.py; `interventions` holds the flags with which the
inference tools (evaluate, generate) apply a saved controller or suppression set.
"""
