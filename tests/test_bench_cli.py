"""The benchmarks' command lines: a mistyped size, key, method or N is one line with exit
code 2, before anything is trained, indexed or timed."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, argv, message", [
    ("benchmarks.train_step", ["--configs", "tiny", "tinyy"],
     "--configs 'tinyy': no prism_tinyy / dense_tinyy pair; sizes: "),
    ("benchmarks.generation", ["--configs", "tiny", "prototypes.top_kk=3"],
     "unknown config key 'prototypes.top_kk' (did you mean 'prototypes.top_k'?)"),
    ("benchmarks.head_cost", ["--configs", "huge"], "--configs 'huge': no prism_huge"),
    ("benchmarks.attribution", ["--sizes", "100000,-5"],
     "--sizes 100000,-5: '-5' is neither a token count >= 1 nor 'all'"),
    ("benchmarks.attribution", ["--methods", "single_pass,foo"],
     "--methods 'single_pass,foo': choose from single_pass, prototype"),
])
def test_bad_benchmark_arguments_are_one_line(tmp_path, module, argv, message):
  proc = subprocess.run([sys.executable, "-m", module, *argv, *(
      ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
      if module == "benchmarks.attribution" else [])], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert lines and message in lines[-1], proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
