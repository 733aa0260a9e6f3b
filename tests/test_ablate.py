"""The ablation harness (benchmarks/ablate.py) on hand-written run logs: no training."""

import json
import os

import pytest

from benchmarks import ablate


def _write_run(workdir, steps, val_loss, speed, diag=None):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(5, steps + 1, 5):
      row = {"step": step, "loss/cross_entropy": 7.0 - step / steps, "tokens_per_second": speed}
      row.update(diag or {})
      f.write(json.dumps(row) + "\n")
    f.write(json.dumps({"step": steps, "val/loss": val_loss, "val/dead_prototypes": 0.25}) + "\n")
    f.write('{"step": 1')  # a torn last line is skipped


def test_rescoring_reuses_finished_runs_and_writes_table_and_plot(tmp_path, capsys):
  root = tmp_path / "tiny_10"
  diag = {"prototypes/dead_in_batch": 0.5, "prototypes/top1_share": 0.25}
  _write_run(root / "dense_s0", 10, 5.0, 1000.0)
  _write_run(root / "dense_s1", 10, 5.2, 1000.0)
  _write_run(root / "defaults_s0", 10, 5.5, 800.0, diag)
  _write_run(root / "defaults_s1", 10, 5.7, 800.0, diag)
  assert ablate.finished(str(root / "dense_s0"), 10)
  assert not ablate.finished(str(root / "dense_s0"), 20)
  ablate.main(["--steps", "10", "--seeds", "0", "1", "--variants", "defaults", "--out",
               str(tmp_path), "--no-train"])
  table = (root / "ablation.md").read_text()
  assert (root / "ablation.png").stat().st_size > 0
  dense_row = next(line for line in table.splitlines() if line.startswith("| dense |"))
  row = next(line for line in table.splitlines() if line.startswith("| defaults |"))
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert cells[3].startswith("5.600")      # mean val loss over the seeds
  assert cells[4] == "0.200"               # seed spread
  assert cells[5] == "+9.8%"               # (5.6 - 5.1) / 5.1
  assert cells[6] == "1.25"                # 1000 / 800 tokens/s
  assert "0.500" in cells and "0.250" in cells  # dead and top-1 share
  assert "+0.0%" in dense_row
  assert "prism_tiny" in table and "seeds [0, 1]" in table  # what it was measured on


def test_a_finished_run_of_other_settings_never_stands_in_for_a_variant(tmp_path, capsys):
  """`make ablate` again with other extra overrides (or a variant redefined) would put the
  first runs in the new table: refused in one line before any training, naming the setting."""
  import experiments
  from prism_jax import config as config_lib

  root = tmp_path / "tiny_10"
  _write_run(root / "dense_s0", 10, 5.0, 1000.0)
  made = config_lib.apply_overrides(experiments.get("dense_tiny"),
                                    ["train.steps=10", "train.seed=0", "train.log_every=5"])
  (root / "dense_s0" / "config.json").write_text(json.dumps(config_lib.to_dict(made)))
  argv = ["--steps", "10", "--variants", "dense", "--out", str(tmp_path), "--no-train"]
  ablate.main(argv)  # the same settings (how often it logged may differ): rescored
  assert (root / "ablation.md").exists()
  with pytest.raises(SystemExit) as exit_info:
    ablate.main([*argv, "losses.z_loss=0.001"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {root / 'dense_s0'} holds a run made with losses.z_loss=0.0, "
                        "not 0.001 (the dense variant's definition")
  assert ablate.other_settings(str(root / "dense_s0"), "dense_tiny",
                               ["train.steps=10", "train.seed=1"]) == "train.seed=0, not 1"
  assert ablate.other_settings(str(root / "nothing_yet"), "dense_tiny", []) is None


def test_train_command_names_the_experiment_workdir_and_overrides():
  cmd = ablate.train_command("prism_tiny", "runs/x", ["train.seed=1"])
  assert cmd[-5:] == ["--exp", "prism_tiny", "--workdir", "runs/x", "train.seed=1"]


@pytest.mark.parametrize("spec", ["3:5", "1024", "a:b", "8:0"])
def test_head_cost_refuses_a_bad_bank_in_one_line(spec, capsys):
  from benchmarks import head_cost
  with pytest.raises(SystemExit) as exit_info:
    head_cost.main(["--banks", spec])
  assert str(exit_info.value).startswith("error: --banks") and spec in str(exit_info.value)


def test_head_cost_floor_is_the_dense_step_plus_the_score_product_and_top_k(monkeypatch,
                                                                           capsys):
  from benchmarks import head_cost
  rows = [("dense unembedding", 50.0), ("M=64, k=4: whole PRISM head", 80.0),
          ("M=64, k=4: score product (forward)", 3.0), ("M=64, k=4: top-k", 7.0),
          ("M=64, k=4: gather mix (fwd+bwd)", 9.0), ("M=64, k=4: dense mix (fwd+bwd)", 8.0)]
  monkeypatch.setattr(head_cost, "measure", lambda size, banks, rounds: rows)
  monkeypatch.setattr(head_cost, "dense_step_ms", lambda size, rounds: 200.0)
  head_cost.main(["--configs", "tiny", "--banks", "64:4", "--rounds", "1"])
  out = capsys.readouterr().out
  assert "dense_tiny train step (whole)" in out and "200.00 ms" in out
  assert "M=64, k=4: floor (score product + top-k)  1.050 x the dense step" in out  # 1 + 10/200
  top_k_line = next(line for line in out.splitlines() if "M=64, k=4: top-k" in line)
  assert top_k_line.split()[-6:] == ["7.00", "ms", "0.140", "x", "dense", "unembedding"]


def test_the_winning_variant_is_the_default_head_and_round1_the_old_one():
  import experiments
  from prism_jax.config import apply_overrides

  for size in ("tiny", "small"):
    configured = experiments.get(f"prism_{size}")
    winner = apply_overrides(configured, ablate.variant_overrides("defaults_st", size))
    # The variants use M = 1024, k = 32 at every size; the experiment scales the bank as
    # 8 D and k as D / 4 (prism_small: 64).
    bank = [f"prototypes.num_prototypes={configured.prototypes.num_prototypes}",
            f"prototypes.top_k={configured.prototypes.top_k}"]
    assert apply_overrides(winner, bank) == configured
    assert ablate.variant_overrides("defaults", size) == []
  old = apply_overrides(experiments.get("prism_tiny"), ablate.variant_overrides("round1", "tiny"))
  assert (old.prototypes.num_prototypes, old.prototypes.top_k) == (256, 8)
  assert (old.prototypes.similarity, old.prototypes.key_init_std) == ("cosine", 1.0)
  assert (old.losses.balance, old.losses.stop_data_gradient) == (0.01, False)
  assert old.losses.diversity_sample == 0 and old.prototypes.straight_through == 0


def test_a_size_without_a_round_one_bank_is_refused_before_any_run(tmp_path):
  with pytest.raises(SystemExit, match="--size 1b: the round-one bank is known for tiny, small"):
    ablate.main(["--size", "1b", "--variants", "keys_0.02", "--out", str(tmp_path)])
  assert not os.listdir(tmp_path)
