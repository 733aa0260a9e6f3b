"""Model parameters from a run's Orbax checkpoint, for every read-only entry point.

  graphdef, params, step = load_params(cfg, workdir)          # latest step
  graphdef, params, step = load_params(cfg, workdir, step=500)

Only the `state` item is read (not the input pipeline), into the shardings the config's
mesh gives the train state, so a model that trained sharded is restored sharded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from etils import epath

from prism_jax import cli, sharding
from prism_jax import config as config_lib
from prism_jax.checkpoint import (Checkpointer, CheckpointDamaged, abstract_with_sharding,
                                  model_settings)
from prism_jax.config import ExperimentConfig
from prism_jax.errors import UserError
from prism_jax import layout
from prism_jax.step import abstract_params


def checkpoint_dir(workdir: str) -> str:
  return layout.path(workdir, layout.CHECKPOINTS)


def load_params(cfg: ExperimentConfig, workdir: str, step: int | None = None,
                mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any, int]:
  """(graphdef, params pytree, restored step) from `workdir/checkpoints`.

  Raises UserError when there is no checkpoint or the requested step is missing.
  """
  directory = checkpoint_dir(workdir)
  if not epath.Path(directory).is_dir():
    raise UserError(f"no checkpoints in {workdir} (expected {directory}); train first, e.g. "
                    f"make train EXP={cfg.name} WORKDIR={workdir}")
  checkpointer = Checkpointer(directory, cfg.checkpoint, read_only=True,
                              settings=model_settings(cfg))
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise UserError(f"no complete checkpoint in {directory}; train first, e.g. "
                      f"make train EXP={cfg.name} WORKDIR={workdir}")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise UserError(f"no checkpoint for step {step} in {directory}; available: "
                      f"{', '.join(map(str, sorted(steps)))}")
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    graphdef, abstract, specs = abstract_params(cfg)
    try:
      params = checkpointer.restore_params(
          step, abstract_with_sharding(abstract, sharding.named(mesh, specs)))
    except CheckpointDamaged as e:  # read-only: name the way on, touch nothing
      others = ", ".join(map(str, sorted(set(steps) - {step}))) or "none"
      raise UserError(f"{e} (the checkpoint is damaged; other steps here: {others}: pass "
                      "--step N, or run train in this workdir, which sets a damaged step "
                      "aside and resumes from the one before)") from None
  finally:
    checkpointer.close()
  return graphdef, params, int(step)


def checkpoint_saved_ns(cfg: ExperimentConfig, workdir: str, step: int) -> int | None:
  """When checkpoint `step` of the run in `workdir` was committed (`Checkpointer.saved_ns`)."""
  checkpointer = Checkpointer(checkpoint_dir(workdir), cfg.checkpoint, read_only=True)
  try:
    return checkpointer.saved_ns(step)
  finally:
    checkpointer.close()


def run_config(cfg: ExperimentConfig, workdir: str, overrides: Sequence[str] = ()
               ) -> ExperimentConfig:
  """The config the run in `workdir` was trained with (its config.json), on this machine's
  mesh, with `overrides` applied; `cfg` (the named experiment) when the run has none.

  So `evaluate --exp prism_tiny --workdir runs/x` sees the model that was trained there,
  whatever overrides training used.
  """
  path = cli.config_path(workdir)
  if path.is_file():
    saved = cli.read_run_config(path)
    try:
      if saved.get("name") != cfg.name:
        raise UserError(f"{workdir} holds a run of {saved.get('name')!r}, not {cfg.name!r}; "
                        f"use --exp {saved.get('name')}")
      sections = {}
      for field in dataclasses.fields(cfg):
        current = getattr(cfg, field.name)
        if dataclasses.is_dataclass(current) and field.name != "mesh":
          sections[field.name] = config_lib.as_trained(current, saved.get(field.name, {}))
      cfg = dataclasses.replace(cfg, **sections)
    except (AttributeError, ValueError, TypeError) as e:
      raise UserError(f"{path} does not hold a valid config ({e}); fix it or move it away "
                      "(the checkpoints carry the model settings)") from None
  trained = cfg
  cfg = config_lib.apply_overrides(cfg, list(overrides))
  if (path.is_file() and cfg.data.dataset == trained.data.dataset
      and cfg.data.validation_fraction != trained.data.validation_fraction):
    # Another split of the same documents: some it would validate on were trained on.
    raise UserError(f"data.validation_fraction={cfg.data.validation_fraction}: the run in "
                    f"{workdir} was trained with {trained.data.validation_fraction}, and another "
                    "split would score documents it trained on; use --val-batches for fewer "
                    "batches, or --text-file / data.dataset for other text")
  return cfg


def load_tokenizer(cfg: ExperimentConfig):
  """The run's tokenizer (prepared with its data; built on first use)."""
  from prism_jax import data as data_lib  # deferred: tfds/grain import cost

  return data_lib.prepare(cfg.data, cfg.model.vocab_size).tokenizer
