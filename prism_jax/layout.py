"""What lives in a run directory, spelled here and nowhere else.

  layout.path(workdir, layout.CHECKPOINTS)      # -> "<workdir>/checkpoints" (gs:// too)
"""

from __future__ import annotations

from etils import epath

CONFIG = "config.json"          # the resolved config of the run
CHECKPOINTS = "checkpoints"     # Orbax steps: state, input position, model settings
METRICS = "metrics.jsonl"       # one JSON object per logged step
TENSORBOARD = "tensorboard"
PROFILE = "profile"             # JAX profiler traces
LOCK = "writer.lock"            # the process writing the run (prism_jax.outputs)
TOKENIZER = "tokenizer.json"   # the tokenizer the run trained with (prism_jax.tokenizer_record)
INDEX = "index"                 # the prototype index (make index)
EVAL = "eval"                   # evaluate: step_<N>[.<what differs>].json
GENERATIONS = "generations"     # generate: <time>[-n].json
CONTROLLERS = "controllers"     # control calibrate: <task>.json, report.json
SUPPRESSIONS = "suppressions"   # control suppress: <name>.json
EXPLORE = "explore"             # explore: labels.json, map.json, report.html


def path(workdir, *parts: str) -> str:
  """`workdir/parts...` through epath, so local folders and buckets read the same."""
  return str(epath.Path(workdir).joinpath(*parts))
