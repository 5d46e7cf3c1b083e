"""An experiment config file with `--set KEY=VALUE` overrides, for the benchmarks that take one
(`checkpoint_save.py`, `startup.py`)."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
from collections.abc import Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser, default: str) -> None:
  """--config FILE (relative to the repository) and repeatable --set KEY=VALUE."""
  parser.add_argument("--config", default=default,
                      help="experiment config file, relative to the repository")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.task_channels=8 (repeatable)")


def load(path: str, overrides: Sequence[str]):
  """`get_config()` of the file at `path`, unlocked, with `overrides` applied; each value is
  converted to the type of the key's default (true / false for booleans)."""
  spec = importlib.util.spec_from_file_location("experiment_config", REPO_ROOT / path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"no config file at {REPO_ROOT / path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.unlock()
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      if value.lower() not in ("true", "false"):
        raise ValueError(f"--set {item!r}: expected true or false")
      node[leaf] = value.lower() == "true"
    else:
      node[leaf] = type(old)(value)
  return config
