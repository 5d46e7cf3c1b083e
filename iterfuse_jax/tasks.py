"""The one task registry: what each dense-prediction task outputs, how it is trained and scored.

Every other module (heads, losses, metrics, data, visualisation) asks this registry rather than
hard-coding per-task facts, so adding a task means adding one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

IGNORE_LABEL = 255
DATASETS = ("nyud", "pascal")
# The survey scores depth predictions clamped to at least this many metres (the network's
# regression is unbounded and goes below 0 where no label ever supervised it, e.g. windows); the
# metrics and `Predictor.predict` both clamp so.
MIN_DEPTH = 1e-9


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Static facts about one task.

  Attributes:
    name: registry key, also the key of the task's label in a batch and of its prediction.
    kind: "segmentation" (integer labels, softmax over classes), "regression" (one float channel,
      0 marks invalid pixels), "binary" (one logit channel, sigmoid, scored per pixel),
      "normals" (three channels, a surface normal normalised to unit length; an all-zero label
      vector marks invalid pixels) or "boundary" (one logit channel, sigmoid, scored by matching
      boundary pixels within a distance).
    num_outputs: output channels per dataset that has this task.
    loss: loss name understood by `iterfuse_jax.losses`.
    loss_weight: weight in the multi-task sum (the survey code's fixed weights).
    metric: name of the task's headline metric (the one that enters Delta_m).
    higher_is_better: sign of the metric in Delta_m.
    loss_options: keyword arguments of the loss (edge: the survey's fixed positive weight).
    offline_metric: the headline metric is not computed by the online metrics of
      `iterfuse_jax.metrics` but after training, over saved predictions
      (`iterfuse_jax.boundary_eval`: edge odsF).
  """

  name: str
  kind: str
  num_outputs: Mapping[str, int]
  loss: str
  loss_weight: float
  metric: str
  higher_is_better: bool
  loss_options: Mapping[str, float] = dataclasses.field(default_factory=dict)
  offline_metric: bool = False


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
    # The survey code's configs (configs/*/mti_net*.yml): normals weight 10, L1 on unit-normalised
    # predictions; edge weight 50, balanced BCE with a fixed positive weight `edge_w` 0.95.
    "normals": TaskSpec(
        name="normals", kind="normals", num_outputs={"nyud": 3, "pascal": 3},
        loss="normals_l1", loss_weight=10.0, metric="mean_angle", higher_is_better=False),
    "edge": TaskSpec(
        name="edge", kind="boundary", num_outputs={"nyud": 1, "pascal": 1},
        loss="weighted_bce", loss_weight=50.0, metric="odsF", higher_is_better=True,
        loss_options={"pos_weight": 0.95}, offline_metric=True),
}

# The tasks the paper trains on each dataset.
DEFAULT_TASKS: Mapping[str, tuple[str, ...]] = {
    "nyud": ("semseg", "depth"),
    "pascal": ("semseg", "human_parts", "sal"),
}

# The survey code's full task sets, which MTI-Net, ATRC and InvPT report.
FULL_TASKS: Mapping[str, tuple[str, ...]] = {
    "nyud": ("semseg", "depth", "normals", "edge"),
    "pascal": ("semseg", "human_parts", "sal", "normals", "edge"),
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


# ATRC's auxiliary label predictions (models/atrc.py; losses.aux_loss): every task becomes a
# classification whose class probabilities pool features. Depth is cut into 40 bins, uniform in
# log depth between 0.7 m and 10 m; binary tasks get two classes.
AUX_DEPTH_BINS = 40
AUX_DEPTH_RANGE = (0.7, 10.0)


def aux_num_classes(task: str, dataset: str) -> int:
  """Classes of ATRC's auxiliary prediction of `task` on `dataset`.

  Segmentation tasks keep their classes, binary and boundary tasks get 2, depth AUX_DEPTH_BINS.
  Normals raise: ATRC clusters them around 40 centroids computed from its own copy of the
  training labels, which this project does not have.
  """
  spec = get_task(task)
  outputs = num_outputs(task, dataset)
  if spec.kind == "segmentation":
    return outputs
  if spec.kind in ("binary", "boundary"):
    return 2
  if spec.kind == "regression":
    return AUX_DEPTH_BINS
  raise ValueError(
      f"task {task!r} has no auxiliary label prediction: ATRC's normals classes are 40 cluster "
      "centroids of its own training labels, which this project does not ship; give the pairs "
      f"that would need them ('tlabel' with target {task!r}, 'slabel' with source {task!r}) the "
      "context 'none', 'global' or 'local'")
