"""Controller and suppression files: small JSON records with a format tag, written atomically."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from prism_jax import outputs
from prism_jax.errors import UserError


def save(path: str, record: dict) -> str:
  return outputs.write_json(path, record)  # whole, then renamed: never half a file


def load(path: str, fmt: str, what: str, how_to_make: str,
         parse: Callable[[dict], Any]) -> Any:
  """`parse(record)` for the record at `path`; UserError when missing, malformed or not `fmt`."""
  if not os.path.isfile(path):
    raise UserError(f"no {what} at {path}; {how_to_make}")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if record.get("format") != fmt:
      raise UserError(f"{path} is not a {fmt} file")
    return parse(record)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
