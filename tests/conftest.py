"""Eight fake CPU devices for sharding tests; must run before jax is imported.

One persistent compilation cache for the session, shared with every process the tests
start (train, index and launch workers inherit the environment): the same train step is
compiled by many tests and subprocesses, and a cache hit skips XLA's compile. The folder is
new for each session (removed at its end), so no run ever reads another's programs.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the plan tests compile for TPU topologies) lets one process load it at a time;
# the suite's workers and subprocesses use no TPU, only its compiler.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="prism-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s on two CPU cores")


def pytest_unconfigure(config):
  if _CACHE_DIR:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
