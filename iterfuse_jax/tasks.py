"""The one task registry: what each dense-prediction task outputs, how it is trained and scored.

Every other module (heads, losses, metrics, data, visualisation) asks this registry rather than
hard-coding per-task facts, so adding a task means adding one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

IGNORE_LABEL = 255
DATASETS = ("nyud", "pascal")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Static facts about one task.

  Attributes:
    name: registry key, also the key of the task's label in a batch and of its prediction.
    kind: "segmentation" (integer labels, softmax over classes), "regression" (one float channel,
      0 marks invalid pixels) or "binary" (one logit channel, sigmoid).
    num_outputs: output channels per dataset that has this task.
    loss: loss name understood by `iterfuse_jax.losses`.
    loss_weight: weight in the multi-task sum (the survey code's fixed weights).
    metric: name of the task's headline metric (the one that enters Delta_m).
    higher_is_better: sign of the metric in Delta_m.
  """

  name: str
  kind: str
  num_outputs: Mapping[str, int]
  loss: str
  loss_weight: float
  metric: str
  higher_is_better: bool


TASKS: Mapping[str, TaskSpec] = {
    "semseg": TaskSpec(
        name="semseg", kind="segmentation", num_outputs={"nyud": 40, "pascal": 21},
        loss="cross_entropy", loss_weight=1.0, metric="mIoU", higher_is_better=True),
    "depth": TaskSpec(
        name="depth", kind="regression", num_outputs={"nyud": 1},
        loss="l1", loss_weight=1.0, metric="rmse", higher_is_better=False),
    "human_parts": TaskSpec(
        name="human_parts", kind="segmentation", num_outputs={"pascal": 7},
        loss="cross_entropy", loss_weight=2.0, metric="mIoU", higher_is_better=True),
    "sal": TaskSpec(
        name="sal", kind="binary", num_outputs={"pascal": 1},
        loss="balanced_bce", loss_weight=5.0, metric="maxIoU", higher_is_better=True),
}

# The tasks the paper trains on each dataset.
DEFAULT_TASKS: Mapping[str, tuple[str, ...]] = {
    "nyud": ("semseg", "depth"),
    "pascal": ("semseg", "human_parts", "sal"),
}


def get_task(name: str) -> TaskSpec:
  """Returns the spec of task `name`, or raises a ValueError listing the known tasks."""
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(
        f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None


def num_outputs(task: str, dataset: str) -> int:
  """Output channels of `task` on `dataset` (e.g. semseg: 40 on NYUD-v2, 21 on PASCAL)."""
  spec = get_task(task)
  if dataset not in spec.num_outputs:
    raise ValueError(
        f"task {task!r} has no labels in dataset {dataset!r}; datasets with this task: "
        f"{sorted(spec.num_outputs)}")
  return spec.num_outputs[dataset]


def validate_tasks(tasks: Sequence[str], dataset: str) -> tuple[str, ...]:
  """Checks that every task exists on `dataset` and returns them as a tuple; raises otherwise."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
  tasks = tuple(tasks)
  if not tasks:
    raise ValueError("at least one task is required")
  if len(set(tasks)) != len(tasks):
    raise ValueError(f"duplicate task in {tasks}")
  for task in tasks:
    num_outputs(task, dataset)
  return tasks
