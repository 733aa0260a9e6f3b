"""One run directory, opened the same way by every tool.

  with Run.open(args.exp, args.workdir, args.overrides) as run:   # evaluate, index, ...
    graphdef, params, step = run.params(args.step)              # parameters only, sharded
    tokenizer = run.tokenizer()

`Run.open` resolves the experiment, joins `jax.distributed` when the environment says the
run spans processes, reads the config the run was trained with (its config.json, with the
command line's overrides), and builds the run's mesh. Inside `with`, that mesh and the run's
logical-axis rules are active for the tool's whole life, so everything the tool jits
(evaluation, sampling, scoring, the index pass) is laid out like training. The names of the
run's folders are spelled here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import jax

from prism_jax import cli, distributed, layout, restore, sharding, tokenizer_record
from prism_jax.config import ExperimentConfig


@dataclasses.dataclass
class Run:
  cfg: ExperimentConfig
  workdir: str
  mesh: jax.sharding.Mesh
  _stack: contextlib.ExitStack | None = None
  _saved_ns: dict = dataclasses.field(default_factory=dict)  # step -> commit time, read once

  @classmethod
  def open(cls, exp: str, workdir: str | None, overrides: Sequence[str] = ()) -> Run:
    """An existing run: the config it was trained with, on this machine's mesh."""
    import argparse

    exp_cfg, workdir = cli.resolve(argparse.Namespace(exp=exp, workdir=workdir, overrides=[]))
    cfg = restore.run_config(exp_cfg, workdir, list(overrides))
    distributed.initialize(cfg.distributed)
    return cls(cfg=cfg, workdir=workdir, mesh=sharding.make_mesh(cfg.mesh))

  @classmethod
  def create(cls, exp: str, workdir: str | None, overrides: Sequence[str] = ()) -> Run:
    """A run to train: the experiment with `overrides` (train refuses a workdir that holds
    a run of other model settings)."""
    import argparse

    cfg, workdir = cli.resolve(argparse.Namespace(exp=exp, workdir=workdir,
                                                  overrides=list(overrides)))
    distributed.initialize(cfg.distributed)
    return cls(cfg=cfg, workdir=workdir, mesh=sharding.make_mesh(cfg.mesh))

  def __enter__(self) -> Run:
    self._stack = contextlib.ExitStack()
    self._stack.enter_context(jax.set_mesh(self.mesh))
    self._stack.enter_context(sharding.use_rules(self.cfg.mesh.rules))
    return self

  def __exit__(self, *exc):
    self._stack.close()
    self._stack = None

  def path(self, *parts: str) -> str:
    """A path in the run directory (names in prism_jax/layout.py)."""
    return layout.path(self.workdir, *parts)

  @property
  def index(self) -> str:
    return self.path(layout.INDEX)

  def params(self, step: int | None = None) -> tuple[Any, Any, int]:
    """(graphdef, parameters, step): the parameters alone (no optimizer state is read),
    restored into the shardings training gives them on this run's mesh."""
    return restore.load_params(self.cfg, self.workdir, step, mesh=self.mesh)

  def saved_ns(self, step: int) -> int | None:
    """When checkpoint `step` was committed: what tells it from an earlier checkpoint of the
    same step (a run deleted and trained again) in whatever records the step it describes."""
    if step not in self._saved_ns:
      self._saved_ns[step] = restore.checkpoint_saved_ns(self.cfg, self.workdir, step)
    return self._saved_ns[step]

  def tokenizer(self):
    """The run's tokenizer, checked against the one it trained with."""
    tokenizer = restore.load_tokenizer(self.cfg)
    tokenizer_record.check(self.workdir, tokenizer)
    return tokenizer

  def data(self):
    """The configured data (prism_jax.data.DataBundle), its tokenizer checked like
    `tokenizer()`'s."""
    from prism_jax import data as data_lib  # deferred: tfds/grain import cost

    bundle = data_lib.prepare(self.cfg.data, self.cfg.model.vocab_size)
    tokenizer_record.check(self.workdir, bundle.tokenizer)
    return bundle

