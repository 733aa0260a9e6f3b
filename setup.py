"""prism-jax: prototype language models (PRISM) in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned together: this set is what the tests run against (jax/flax/orbax/grain move fast).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "sentencepiece==0.2.3",
    "chex==0.1.92",
    "tensorboardX==2.6.5",
    # gs:// workdirs, data and tokenizers: etils.epath reaches buckets through fsspec's gcsfs
    # (Orbax's arrays go through tensorstore, which has its own GCS driver).
    "gcsfs==2026.10.1",
    "tqdm==4.70.1",
    "numpy==2.4.6",
]

setup(
    name="prism-jax",
    version="0.1.0",
    description="Prototype language models (PRISM) and matched dense baselines in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["prism_jax", "prism_jax.*", "experiments"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # playwright drives Debian's /usr/bin/chromium in tests/test_explore.py (never
        # `playwright install`); without chromium the test skips, or fails under CI=true.
        # pytest-xdist: `make test` runs the suite in two processes (12 min instead of 20 on
        # two cores: much of a test's time is single-threaded compilation).
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "pytest-xdist==3.8.0",
                "tensorboard==2.21.0", "playwright==1.65.2"],
        # `plan` compiles the steps for a TPU topology on CPU (prism_jax/aot.py): the TPU
        # runtime release that jax 0.10.2 pins (jax[tpu] requires libtpu==0.0.42.*).
        "tpu-plan": ["libtpu==0.0.42.1"],
    },
)
