"""`python -m benchmarks.attribution --quick` runs and reports every method with its ratios."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import attribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # about a minute of CPU (every method compiles once); more on a busy machine
@pytest.mark.timeout(3600)
def test_quick_benchmark_reports_every_method(tmp_path):
  env = dict(os.environ)
  # One CPU device, as `make bench` runs it (conftest asks for eight fake ones).
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip()
  out = subprocess.run([sys.executable, "-m", "benchmarks.attribution", "--quick", "--out",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=3500)
  assert out.returncode == 0, out.stderr[-3000:]
  table = (tmp_path / "attribution.md").read_text()
  result = json.loads((tmp_path / "attribution.json").read_text())
  assert "random-weight" in result["label"]["model"]  # a quick figure says what it is
  for method in attribution.METHODS:
    assert f"| {method}" in table, method
  assert "| trak@single_pass_bytes" in table
  for column in ("EK-FAC / single_pass", "TRAK @ equal bytes / single_pass",
                 "slope, all N"):
    assert column in table, column
  statuses = {r["status"] for r in result["rows"]}
  assert "extrapolated" in statuses  # the extrapolation path is exercised and labelled
  assert "extrapolated" in table
  ratio = result["ratios"][-1]
  assert ratio["trak@single_pass_bytes"]["speedup"] > 0
  sp = [r for r in result["rows"] if r["variant"] == "single_pass" and r["status"] == "measured"]
  eq = [r for r in result["rows"] if r["variant"] == "trak@single_pass_bytes"]
  for a, b in zip(sp, eq):  # equal bytes: TRAK's state is sized to single_pass's index
    assert 0.8 <= b["stored_bytes"] / a["stored_bytes"] <= 1.0001
  assert (tmp_path / "attribution_speed.png").exists()
  side = result["side_by_side"]  # every index in one process, queries interleaved
  assert [r["tokens"] for r in side["rows"]] == result["sizes"]
  for r in side["rows"]:
    assert r["query_s"] > 0 and 0 < r["distinct_positions"] <= r["postings_read"]
  assert "single_pass side by side" in table


def test_extrapolation_arithmetic():
  rows = [{"tokens": 100, "query_s": 1.0}, {"tokens": 200, "query_s": 2.0}]
  value, how = attribution.extrapolate(rows, 1000, "query_s")
  assert abs(value - 10.0) < 1e-9 and "1,000" in how
  value, _ = attribution.extrapolate(rows[:1], 400, "query_s")
  assert abs(value - 4.0) < 1e-9
