"""Entry points: one module per command (`python -m prism_jax.main.TOOL`).

Each parses its flags, opens the run (prism_jax/run.py) and calls library code one floor
below, then prints. Entry points import libraries, never each other; no library imports them
(tests/test_module_map.py checks both).
"""
