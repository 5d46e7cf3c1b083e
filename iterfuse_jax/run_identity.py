"""Whether a config continues the run a workdir holds, or is another experiment.

A workdir holds one run. Running its command again may lengthen it (`num_epochs`,
`num_train_steps`), evaluate or log it differently, read the data from another folder, or run
it on other hardware or in another precision. A different model, task set, training data,
batch, seed, optimiser or loss weighting is another experiment: its checkpoints would not
restore, or would restore into another recipe, and its results would be filed under the stored
run's name (the comparison table reads a workdir's config.json to name its row).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import flax

# Prefixes of the flattened config ("model.tpim.n_iter") that define the experiment.
IDENTITY_KEYS = ("model", "dataset.name", "dataset.tasks", "dataset.train_split",
                 "dataset.train_size", "batch_size", "seed", "optimizer", "loss_weights")
# Inside them, choices that compute the same network from the same parameters.
FREE_KEYS = ("model.dtype", "model.pretrained", "model.tpim.ifb_impl",
             "model.tpim.ifb_products", "model.tpim.ifb_gradient")


def _flatten(config: Mapping[str, Any]) -> dict[str, Any]:
  # Through JSON, as config.json stores it: tuples and lists compare equal.
  plain = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
  return flax.traverse_util.flatten_dict(plain, sep=".")


def _is_identity(key: str) -> bool:
  def under(prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")
  return any(map(under, IDENTITY_KEYS)) and not any(map(under, FREE_KEYS))


def differences(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """The identity keys whose values differ, as 'key: stored -> new' lines (sorted).

  Args:
    stored: the workdir's config.json, as a dict.
    new: the config of the command now run, as a dict (`config.to_dict()`).
  """
  old_flat, new_flat = _flatten(stored), _flatten(new)
  # A key only one side has is a field added to (or dropped from) the configs since the stored
  # run started, not a choice its command made: a renamed model shows in model.name.
  return [f"{key}: {json.dumps(old_flat[key])[:80]} -> {json.dumps(new_flat[key])[:80]}"
          for key in sorted(set(old_flat) & set(new_flat))
          if _is_identity(key) and old_flat[key] != new_flat[key]]
