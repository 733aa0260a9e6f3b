"""Which tokenizer a run trained with: WORKDIR/tokenizer.json, checked by every tool.

The model's token ids mean what that tokenizer made of the text. Resumed, or read, under
another tokenizer of the same size (a data_cache rebuilt from another corpus, another
data.tokenizer), a run would train on or be scored on ids that name other pieces, with no
error anywhere: `train` records the tokenizer's SHA-256 and every tool compares.
"""

from __future__ import annotations

import json

from etils import epath

from prism_jax import layout, outputs
from prism_jax.errors import UserError


def fingerprint(tokenizer) -> str | None:
  """SHA-256 of a sentencepiece model's bytes; None for a tokenizer without them (tests')."""
  return getattr(tokenizer, "fingerprint", None)


def _recorded(workdir: str) -> dict | None:
  path = epath.Path(layout.path(workdir, layout.TOKENIZER))
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); it names the run's tokenizer") from None
  return record if isinstance(record, dict) else None


def check(workdir: str, tokenizer, record: dict | None = None) -> None:
  """Refuses a tokenizer other than the one the run in `workdir` recorded (`record`, when
  the caller has read it already)."""
  mine, record = fingerprint(tokenizer), record or _recorded(workdir)
  if mine is None or record is None or record.get("sha256") == mine:
    return
  raise UserError(f"the tokenizer {getattr(tokenizer, 'path', '') or '(in memory)'} is not "
                  f"the one the run in {workdir} trained with ({record.get('path')}, sha256 "
                  f"{str(record.get('sha256'))[:12]}..., not {mine[:12]}...); point "
                  "data.tokenizer at that model, or use another --workdir")


def record_or_check(workdir: str, tokenizer, resuming: bool, is_main: bool = True) -> None:
  """train: a resume must use the tokenizer recorded (a run from before the record gets
  one); a start records it, replacing one an attempt that never saved left behind."""
  record = _recorded(workdir) if resuming else None
  if record is not None:
    check(workdir, tokenizer, record)
  mine = fingerprint(tokenizer)
  if mine is not None and is_main and record is None:
    path = getattr(tokenizer, "path", "")
    outputs.write_json(layout.path(workdir, layout.TOKENIZER),
                       {"path": outputs.absolute(path) if path else "", "sha256": mine})
