"""Typed configs: every mistake a user can type is one line naming the problem."""

import re
import subprocess
import sys

import pytest

import experiments
from prism_jax import config as config_lib
from prism_jax.config import ConfigError, apply_overrides, flat_keys


def test_overrides_parse_types():
  cfg = apply_overrides(experiments.get("prism_tiny"),
                        ["train.steps=7", "optimizer.learning_rate=1e-4",
                         "model.tie_embeddings=false", "prototypes.similarity=neg_sq_distance"])
  assert cfg.train.steps == 7 and cfg.optimizer.learning_rate == 1e-4
  assert cfg.model.tie_embeddings is False
  assert cfg.prototypes.similarity == "neg_sq_distance"


@pytest.mark.parametrize("overrides, message", [
    (["model.d_modle=64"], "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
    (["train.steps=ten"], "train.steps='ten' is not a valid int"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings='maybe' is not a boolean"),
    (["prototypes.similarity=manhattan"], "prototypes.similarity='manhattan' is not one of"),
    (["train.steps"], "is not of the form key=value"),
    (["prototypes.top_k=9999"], "prototypes.top_k=9999 must be in [1,"),
    (["model.num_heads=5"], "not divisible by model.num_heads=5"),
])
def test_bad_overrides_name_the_problem(overrides, message):
  with pytest.raises(ConfigError) as info:
    apply_overrides(experiments.get("prism_tiny"), overrides)
  assert message in str(info.value)
  assert "\n" not in str(info.value)


def test_unknown_experiment_suggests_nearest():
  with pytest.raises(ConfigError, match="unknown experiment 'prism_tiyn' .did you mean 'prism_tiny'"):
    experiments.get("prism_tiyn")


@pytest.mark.parametrize("argv, message", [
    (["--exp", "prism_tiyn"], "error: unknown experiment 'prism_tiyn'"),
    (["train.stepz=3"], "error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["train.steps=-1"], "error: prism_tiny: train.steps=-1 must be in [1, "),
])
def test_train_entry_point_exits_2_with_one_line(argv, message, tmp_path):
  result = subprocess.run([sys.executable, "-m", "prism_jax.main.train", "--workdir",
                           str(tmp_path), *argv], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines == [lines[0]] and lines[0].startswith(message), result.stderr


def test_resuming_with_a_different_model_is_refused(tmp_path):
  from prism_jax.cli import check_run_config, write_run_config

  cfg = experiments.get("prism_tiny")
  write_run_config(cfg, str(tmp_path))
  check_run_config(apply_overrides(cfg, ["train.steps=5"]), str(tmp_path))  # fine
  # how the step computes the head, not the model: resuming under another value is fine
  check_run_config(apply_overrides(cfg, ["prototypes.score_blocks=4"]), str(tmp_path))
  with pytest.raises(ConfigError, match="holds a run with model.d_model=128, not 64"):
    check_run_config(apply_overrides(cfg, ["model.d_model=64"]), str(tmp_path))
  # the seed drew the run's initial parameters and its per-step draws; compare's table
  # names it: a resume under another seed would train (or score) seed 0's run as seed 1's
  with pytest.raises(ConfigError, match="holds a run started with train.seed=0, not 1"):
    check_run_config(apply_overrides(cfg, ["train.seed=1"]), str(tmp_path))


@pytest.mark.parametrize("override, message", [
    ("data.validation_fraction=0.2", "data.validation_fraction=0.05, not 0.2"),
    ("data.batch_size=8", "data.batch_size=16, not 8"),
    ("data.seq_len=64", "data.seq_len=128, not 64"),
    ("data.shuffle_seed=3", "data.shuffle_seed=0, not 3"),
    ("data.dataset=c4", "data.dataset='prism_corpus', not 'c4'"),
])
def test_resuming_on_another_data_stream_is_refused(tmp_path, override, message):
  """A wider validation split would hold out documents the run trained on; another batch,
  length, order or corpus would not continue from the saved input position."""
  from prism_jax.cli import check_run_config, write_run_config

  cfg = experiments.get("prism_tiny")
  write_run_config(cfg, str(tmp_path))
  # where the data lives, and the optimizer, may change on resume
  check_run_config(apply_overrides(cfg, ["data.data_dir=/elsewhere", "data.source_dir=/x",
                                         "data.prefetch=0", "optimizer.learning_rate=1e-4"]),
                   str(tmp_path))
  with pytest.raises(ConfigError, match=f"holds a run trained with {re.escape(message)} "):
    check_run_config(apply_overrides(cfg, [override]), str(tmp_path))


def test_a_setting_added_after_a_run_trained_reads_as_its_default(tmp_path):
  """An older run's config.json lacks settings added since; it ran as their defaults, even
  where the experiment now sets another value (resuming and read-only tools alike)."""
  import json

  from prism_jax import layout
  from prism_jax.cli import check_run_config
  from prism_jax.restore import run_config

  # the experiment as a later release might set it, and the run's config.json from before
  cfg = apply_overrides(experiments.get("prism_tiny"), ["prototypes.whiten_rate=0.1"])
  saved = config_lib.to_dict(cfg)
  del saved["prototypes"]["whiten_rate"]
  (tmp_path / layout.CONFIG).write_text(json.dumps(saved))
  assert run_config(cfg, str(tmp_path)).prototypes.whiten_rate == 0.0
  check_run_config(apply_overrides(cfg, ["prototypes.whiten_rate=0"]), str(tmp_path))
  with pytest.raises(ConfigError, match="prototypes.whiten_rate=0.0, not 0.1"):
    check_run_config(cfg, str(tmp_path))


def test_every_number_has_exactly_one_range_row():
  """prism_jax/limits.py is the one table: every int/float setting has a row, none is stale."""
  from prism_jax import limits
  from prism_jax.attribution.config import AttributionConfig

  numeric = {k for k, t in flat_keys(experiments.get("prism_tiny")).items() if t in (int, float)}
  numeric |= {f"attr.{k}" for k, t in flat_keys(AttributionConfig()).items() if t in (int, float)}
  assert numeric == set(limits.CONFIG_RANGES)
  for name in experiments.names():  # every shipped experiment sits inside the table
    config_lib.check_ranges(experiments.get(name))


def test_every_prism_experiment_uses_the_ablations_winning_head():
  """docs/evaluate.md, rounds five to eight: dot scores, keys at 0.02, M >= 8 D, k = 32
  (prism_small: 64 = D / 4), the straight-through gradient, the k-means pull, balance 0.05,
  no selection bias, the head in 8 blocks at accelerator scale; a dense twin differs from
  its sibling in the head alone."""
  prism = [n for n in experiments.names() if experiments.get(n).model.head == "prism"]
  assert {"prism_tiny", "prism_small", "prism_130m", "prism_350m", "prism_1b"} <= set(prism)
  for name in prism:
    cfg = experiments.get(name)
    head = cfg.prototypes
    top_k = 64 if name == "prism_small" else 32
    assert (head.similarity, head.key_init_std, head.top_k) == ("dot", 0.02, top_k), name
    assert head.straight_through == 1.0, name
    assert head.score_blocks == (8 if cfg.model.scan_layers else 1), name
    assert head.num_prototypes >= 8 * cfg.model.d_model, name
    assert head.selection_bias_rate == 0.0, name
    assert cfg.losses == experiments.PROTOTYPE_LOSSES, name
    twin = experiments.get(name.replace("prism", "dense", 1))
    assert twin == experiments.dense_twin(cfg, twin.name)


@pytest.mark.parametrize("order", [1, -1])
def test_settings_valid_only_together_are_accepted_in_either_order(order):
  # prism_tiny has k = 32: a bank of 8 is valid only once k is lowered too.
  together = ["prototypes.num_prototypes=8", "prototypes.top_k=2"][::order]
  cfg = apply_overrides(experiments.get("prism_tiny"), together)
  assert (cfg.prototypes.num_prototypes, cfg.prototypes.top_k) == (8, 2)
  with pytest.raises(ConfigError, match="prototypes.top_k=32 must be in .1, prototypes.num_pro"):
    apply_overrides(experiments.get("prism_tiny"), ["prototypes.num_prototypes=8"])


def test_overrides_after_a_list_flag_stay_overrides(capsys):
  """`--tasks none train.seed=1` once read the override as a task ("unknown task 'none'")."""
  from benchmarks import common
  from prism_jax import cli
  from prism_jax.main import evaluate

  args = evaluate.parse_args(["--tasks", "none", "train.seed=1", "model.d_model=64"])
  assert args.tasks == ["none"] and args.overrides == ["train.seed=1", "model.d_model=64"]
  args = common.parser("bench", rounds=1).parse_args(["--configs", "small", "prototypes.top_k=32"])
  assert args.configs == ["small"] and args.overrides == ["prototypes.top_k=32"]

  parser = cli.base_parser("test")
  parser.add_argument("--prompts", nargs="+", free_text=True)
  parser.add_argument("--tasks", nargs="+")
  parser.add_argument("--ids", type=cli.number_flag("--prototypes"), nargs="+")
  args = parser.parse_args(["train.steps=2", "--prompts", "x=1 means", "a=b",
                            "--tasks", "piqa", "train.seed=1"])
  assert args.prompts == ["x=1 means", "a=b"]  # free text keeps its "="
  assert args.tasks == ["piqa"] and args.overrides == ["train.steps=2", "train.seed=1"]
  capsys.readouterr()
  for argv, message in [(["--tasks", "train.seed=1"], "--tasks needs a value before "
                                                        "'train.seed=1'"),
                        (["--ids", "3", "train.seed=1"], "override: put it before --prototypes")]:
    with pytest.raises(SystemExit) as info:
      parser.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
