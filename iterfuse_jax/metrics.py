"""Evaluation metrics as clu metrics: split-level sums, so that merging batches is exact.

`make_eval_metrics(tasks, dataset)` builds a `clu.metrics.Collection` with one metric per task.
Every metric state is a sum (pixel counts, squared errors, per-image scores), so
`a.merge(b)` equals the metric of the concatenated batches; examples whose `example_mask` is
False (padding of the last eval batch) and pixels labelled 255 contribute nothing.

Conventions (the MTL survey code of Vandenhende et al., see ../shared/REFERENCE.md):
  * segmentation (semseg, human_parts): one confusion matrix over the whole split. IoU per class
    = TP / (TP + FP + FN), mIoU = mean over ALL classes of the dataset; a class that has neither
    ground truth nor prediction in the split scores IoU 0 (the survey divides by
    max(TP + FP + FN, 1e-8)), so on a full split, where every class occurs, this is the usual
    mIoU, while on a tiny subset absent classes pull it down. Pixel accuracy = trace / total.
  * depth: global errors over all valid pixels of the split (label > 0 and != 255), not means of
    per-image values: rmse = sqrt(sum sq. error / #valid), log_rmse likewise on log depth,
    abs_rel = mean |pred - gt| / gt. As in the survey, predictions are clamped to >= 1e-9 first.
  * saliency: probabilities sigmoid(logit) binarised at each of linspace(0.2, 0.9, 15) (strictly
    greater); per image IoU (1 when ground truth and prediction are both empty), precision and
    recall (with 1e-12 in the denominators); means over images per threshold; max_iou = max over
    thresholds of the mean IoU, max_f = max over thresholds of 2 P R / (P + R) of the mean
    precision and recall (beta = 1). Labels are {0, 1} (>= 0.5 positive), 255 ignored.
  * normals: prediction and label normalised to unit length, angle = arccos(clip(dot, -1, 1)) in
    degrees over the valid pixels of the split (label vector not all 0), as the survey's
    `eval_normals`: mean, median, rmse of the angles and the percentage of pixels under 11.25,
    22.5 and 30 degrees. The median comes from a histogram of 0.01-degree bins (exact to 0.005
    degrees), so that it too merges exactly.
  * edge: online, only the loss (the survey's `EdgeMeter`: the weighted BCE with the training's
    positive weight, over the pixels at the original size). The headline odsF is computed after
    training over saved predictions by `iterfuse_jax.boundary_eval` (registry: offline_metric).

Predictions come as logits (the metrics decode: argmax, sigmoid) or, with `decoded=True`, already
decoded at the label size (class ids [B, H, W], probabilities [B, H, W, 1]), which is how the
survey code's order of evaluation resizes them (`iterfuse_jax.eval_resizing`).

Units of `compute()`: mIoU, pixel accuracy, max_iou and max_f in percent (as in the paper's
tables, e.g. 35.0091), depth errors in metres (rmse 0.6610), normal angles in degrees and their
accuracies in percent; boundary_eval's odsF in percent.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from iterfuse_jax import tasks as task_registry
from iterfuse_jax.tasks import IGNORE_LABEL, MIN_DEPTH

SALIENCY_THRESHOLDS = tuple(float(t) for t in np.linspace(0.2, 0.9, 15))
# The survey's normal accuracies: percentage of pixels with an angular error under each bound.
NORMALS_ANGLE_BOUNDS = (11.25, 22.5, 30.0)
NORMALS_BIN_DEGREES = 0.01
_NORMALS_BINS = round(180.0 / NORMALS_BIN_DEGREES)
# Registry metric name (tasks.TaskSpec.metric) -> key of the results that holds it (the online
# metrics' `compute()`, or boundary_eval's results for offline metrics).
_HEADLINE_KEYS = {"mIoU": "miou", "rmse": "rmse", "maxIoU": "max_iou", "mean_angle": "mean_angle",
                  "odsF": "odsF"}


def _example_mask(example_mask: jax.Array | None, batch_size: int) -> jax.Array:
  """[B] bool; all True when no mask is given."""
  if example_mask is None:
    return jnp.ones((batch_size,), bool)
  if example_mask.shape != (batch_size,):
    raise ValueError(f"example_mask must be [B] = [{batch_size}], got shape "
                     f"{example_mask.shape}")
  return example_mask.astype(bool)


def _task_inputs(task: str, predictions: Mapping[str, jax.Array],
                 labels: Mapping[str, jax.Array],
                 channels: int | None) -> tuple[jax.Array, jax.Array]:
  """Checks and returns (predictions, labels [B, H, W]) of one task.

  Predictions are [B, H, W, channels], or [B, H, W] (class ids) when `channels` is None.
  """
  if task not in predictions or task not in labels:
    raise ValueError(f"metrics of task {task!r} need predictions[{task!r}] and labels[{task!r}]; "
                     f"got predictions for {sorted(predictions)}, labels for {sorted(labels)}")
  pred, label = predictions[task], labels[task]
  if channels is None:
    if pred.ndim != 3 or not jnp.issubdtype(pred.dtype, jnp.integer):
      raise ValueError(f"{task}: decoded predictions must be integer class ids [B, H, W], got "
                       f"{pred.dtype} {pred.shape}")
  elif pred.ndim != 4 or pred.shape[-1] != channels:
    raise ValueError(f"{task}: predictions must be [B, H, W, {channels}], got {pred.shape}")
  if label.ndim == 4 and label.shape[-1] == 1:
    label = label[..., 0]
  if label.shape != pred.shape[:3]:
    raise ValueError(f"{task}: labels of shape {label.shape} do not match predictions of shape "
                     f"{pred.shape}; expected [B, H, W]")
  return pred, label


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """Confusion matrix of one segmentation task over a split.

  Subclasses made by `confusion_matrix_metric` fix `task` and `num_classes`.

  Attributes:
    matrix: [C, C] int32 pixel counts, rows = ground truth, columns = prediction.
    invalid_labels: int32 count of labels outside [0, C) that are not 255 (a data error that
      `compute` reports instead of silently dropping those pixels).
  """

  matrix: jax.Array
  invalid_labels: jax.Array

  task: ClassVar[str] = ""
  num_classes: ClassVar[int] = 0

  @classmethod
  def empty(cls) -> ConfusionMatrix:
    return cls(matrix=jnp.zeros((cls.num_classes, cls.num_classes), jnp.int32),
               invalid_labels=jnp.zeros((), jnp.int32))

  @classmethod
  def from_model_output(cls, predictions: Mapping[str, jax.Array],
                        labels: Mapping[str, jax.Array], example_mask: jax.Array | None = None,
                        decoded: bool = False, **_) -> ConfusionMatrix:
    """predictions[task]: [B, H, W, C] logits, or [B, H, W] class ids when `decoded`;
    labels[task]: [B, H, W] ids, 255 ignored."""
    pred, label = _task_inputs(cls.task, predictions, labels,
                               None if decoded else cls.num_classes)
    n = cls.num_classes
    label = label.astype(jnp.int32)
    keep = _example_mask(example_mask, label.shape[0])[:, None, None] & (label != IGNORE_LABEL)
    in_range = (label >= 0) & (label < n)
    if not decoded:
      pred = jnp.argmax(pred, axis=-1)
    pred = pred.astype(jnp.int32)
    index = jnp.where(keep & in_range, label * n + pred, n * n)  # n * n: dropped by bincount
    matrix = jnp.bincount(index.reshape(-1), length=n * n).reshape(n, n).astype(jnp.int32)
    return cls(matrix=matrix, invalid_labels=jnp.sum(keep & ~in_range).astype(jnp.int32))

  def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
    return type(self)(matrix=self.matrix + other.matrix,
                      invalid_labels=self.invalid_labels + other.invalid_labels)

  def per_class_iou(self) -> jax.Array:
    """[C] IoU per class (fraction); 0 for a class with no ground truth and no prediction."""
    m = self.matrix.astype(jnp.float32)
    tp = jnp.diag(m)
    union = m.sum(0) + m.sum(1) - tp  # TP + FP + FN
    return tp / jnp.maximum(union, 1e-8)

  def compute(self) -> dict[str, jax.Array]:
    if _is_concrete(self.invalid_labels) and int(self.invalid_labels) > 0:
      raise ValueError(
          f"{self.task}: {int(self.invalid_labels)} labelled pixels have a class id outside "
          f"[0, {self.num_classes}) and are not {IGNORE_LABEL}; check the dataset's labels")
    m = self.matrix.astype(jnp.float32)
    return {
        "miou": 100.0 * jnp.mean(self.per_class_iou()),
        "pixel_acc": 100.0 * jnp.trace(m) / jnp.maximum(m.sum(), 1.0),
    }


@flax.struct.dataclass
class DepthErrors(clu_metrics.Metric):
  """Global depth errors over all valid pixels of a split.

  Attributes:
    squared_error: float32 sum of (pred - gt)^2 over valid pixels.
    log_squared_error: float32 sum of (log pred - log gt)^2.
    abs_rel_error: float32 sum of |pred - gt| / gt.
    num_valid: int32 number of valid pixels.
  """

  squared_error: jax.Array
  log_squared_error: jax.Array
  abs_rel_error: jax.Array
  num_valid: jax.Array

  task: ClassVar[str] = "depth"

  @classmethod
  def empty(cls) -> DepthErrors:
    zero = jnp.zeros((), jnp.float32)
    return cls(squared_error=zero, log_squared_error=zero, abs_rel_error=zero,
               num_valid=jnp.zeros((), jnp.int32))

  @classmethod
  def from_model_output(cls, predictions: Mapping[str, jax.Array],
                        labels: Mapping[str, jax.Array], example_mask: jax.Array | None = None,
                        **_) -> DepthErrors:
    """predictions[task]: [B, H, W, 1] depth; labels[task]: [B, H, W] depth, 0 = invalid."""
    pred, gt = _task_inputs(cls.task, predictions, labels, 1)
    pred = jnp.maximum(pred[..., 0].astype(jnp.float32), MIN_DEPTH)
    gt = gt.astype(jnp.float32)
    valid = (_example_mask(example_mask, gt.shape[0])[:, None, None] & (gt > 0)
             & (gt != IGNORE_LABEL))
    safe_gt = jnp.where(valid, gt, 1.0)

    def total(x):
      return jnp.sum(jnp.where(valid, x, 0.0))

    return cls(squared_error=total((pred - safe_gt) ** 2),
               log_squared_error=total((jnp.log(pred) - jnp.log(safe_gt)) ** 2),
               abs_rel_error=total(jnp.abs(pred - safe_gt) / safe_gt),
               num_valid=jnp.sum(valid).astype(jnp.int32))

  def merge(self, other: DepthErrors) -> DepthErrors:
    return jax.tree.map(jnp.add, self, other)

  def compute(self) -> dict[str, jax.Array]:
    n = self.num_valid.astype(jnp.float32)
    # NaN, not 0, when the split has no valid depth: an error of 0 would look perfect.
    n = jnp.where(n > 0, n, jnp.nan)
    return {
        "rmse": jnp.sqrt(self.squared_error / n),
        "log_rmse": jnp.sqrt(self.log_squared_error / n),
        "abs_rel": self.abs_rel_error / n,
    }


@flax.struct.dataclass
class SaliencyScores(clu_metrics.Metric):
  """Per-threshold sums of per-image IoU, precision and recall.

  Attributes:
    iou: [K] float32 sum over images of the IoU at each threshold.
    precision: [K] float32 sum over images of the precision.
    recall: [K] float32 sum over images of the recall.
    num_images: int32 number of images.
  """

  iou: jax.Array
  precision: jax.Array
  recall: jax.Array
  num_images: jax.Array

  task: ClassVar[str] = "sal"
  thresholds: ClassVar[tuple[float, ...]] = SALIENCY_THRESHOLDS

  @classmethod
  def empty(cls) -> SaliencyScores:
    zeros = jnp.zeros((len(cls.thresholds),), jnp.float32)
    return cls(iou=zeros, precision=zeros, recall=zeros, num_images=jnp.zeros((), jnp.int32))

  @classmethod
  def from_model_output(cls, predictions: Mapping[str, jax.Array],
                        labels: Mapping[str, jax.Array], example_mask: jax.Array | None = None,
                        decoded: bool = False, **_) -> SaliencyScores:
    """predictions[task]: [B, H, W, 1] logits, or probabilities when `decoded`;
    labels[task]: [B, H, W] in {0, 1}, 255 ignored."""
    pred, label = _task_inputs(cls.task, predictions, labels, 1)
    label = label.astype(jnp.float32)
    keep = _example_mask(example_mask, label.shape[0])
    valid = (label != IGNORE_LABEL)[..., None]  # [B, H, W, 1]
    gt = valid & (label >= 0.5)[..., None]
    pred = pred.astype(jnp.float32)
    prob = pred if decoded else jax.nn.sigmoid(pred)  # [B, H, W, 1]
    pred = valid & (prob > jnp.asarray(cls.thresholds, jnp.float32))  # [B, H, W, K]

    def count(x):
      return jnp.sum(x, axis=(1, 2)).astype(jnp.float32)  # [B, K]

    tp, fp, fn = count(pred & gt), count(pred & ~gt), count(~pred & gt)
    union = tp + fp + fn
    iou = jnp.where(union > 0, tp / jnp.maximum(union, 1.0), 1.0)
    precision = tp / (tp + fp + 1e-12)
    recall = tp / (tp + fn + 1e-12)

    def total(x):
      return jnp.sum(jnp.where(keep[:, None], x, 0.0), axis=0)

    return cls(iou=total(iou), precision=total(precision), recall=total(recall),
               num_images=jnp.sum(keep).astype(jnp.int32))

  def merge(self, other: SaliencyScores) -> SaliencyScores:
    return jax.tree.map(jnp.add, self, other)

  def compute(self) -> dict[str, jax.Array]:
    n = self.num_images.astype(jnp.float32)
    n = jnp.where(n > 0, n, jnp.nan)
    mean_precision, mean_recall = self.precision / n, self.recall / n
    f_score = 2 * mean_precision * mean_recall / (mean_precision + mean_recall + 1e-12)
    return {"max_iou": 100.0 * jnp.max(self.iou / n), "max_f": 100.0 * jnp.max(f_score)}


@flax.struct.dataclass
class NormalsErrors(clu_metrics.Metric):
  """Angular errors of surface normals over all valid pixels of a split.

  Attributes:
    angle_sum: float32 sum of the angles (degrees).
    angle_squared_sum: float32 sum of the squared angles.
    within: [3] int32 pixels with an angle under each of NORMALS_ANGLE_BOUNDS.
    histogram: [18000] int32 pixel counts per 0.01-degree bin (for the median).
    num_valid: int32 number of valid pixels.
  """

  angle_sum: jax.Array
  angle_squared_sum: jax.Array
  within: jax.Array
  histogram: jax.Array
  num_valid: jax.Array

  task: ClassVar[str] = "normals"

  @classmethod
  def empty(cls) -> NormalsErrors:
    zero = jnp.zeros((), jnp.float32)
    return cls(angle_sum=zero, angle_squared_sum=zero,
               within=jnp.zeros((len(NORMALS_ANGLE_BOUNDS),), jnp.int32),
               histogram=jnp.zeros((_NORMALS_BINS,), jnp.int32),
               num_valid=jnp.zeros((), jnp.int32))

  @classmethod
  def from_model_output(cls, predictions: Mapping[str, jax.Array],
                        labels: Mapping[str, jax.Array], example_mask: jax.Array | None = None,
                        **_) -> NormalsErrors:
    """predictions[task]: [B, H, W, 3] (any length); labels[task]: [B, H, W, 3], 0 = invalid."""
    task = cls.task
    if task not in predictions or task not in labels:
      raise ValueError(f"metrics of task {task!r} need predictions[{task!r}] and "
                       f"labels[{task!r}]; got predictions for {sorted(predictions)}, labels for "
                       f"{sorted(labels)}")
    pred, label = predictions[task], labels[task]
    if pred.ndim != 4 or pred.shape[-1] != 3 or label.shape != pred.shape:
      raise ValueError(f"{task}: predictions and labels must both be [B, H, W, 3], got "
                       f"{pred.shape} and {label.shape}")
    label = label.astype(jnp.float32)
    valid = (_example_mask(example_mask, label.shape[0])[:, None, None]
             & jnp.any(label != 0, axis=-1))

    def unit(x):
      x = x.astype(jnp.float32)
      return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)

    cosine = jnp.clip(jnp.sum(unit(pred) * unit(label), axis=-1), -1.0, 1.0)
    angle = jnp.degrees(jnp.arccos(cosine))
    bins = jnp.clip(jnp.floor(angle / NORMALS_BIN_DEGREES).astype(jnp.int32), 0,
                    _NORMALS_BINS - 1)
    bins = jnp.where(valid, bins, _NORMALS_BINS)  # out of range: dropped by bincount
    within = jnp.stack([jnp.sum(valid & (angle < bound)) for bound in NORMALS_ANGLE_BOUNDS])
    return cls(angle_sum=jnp.sum(jnp.where(valid, angle, 0.0)),
               angle_squared_sum=jnp.sum(jnp.where(valid, angle ** 2, 0.0)),
               within=within.astype(jnp.int32),
               histogram=jnp.bincount(bins.reshape(-1), length=_NORMALS_BINS).astype(jnp.int32),
               num_valid=jnp.sum(valid).astype(jnp.int32))

  def merge(self, other: NormalsErrors) -> NormalsErrors:
    return jax.tree.map(jnp.add, self, other)

  def compute(self) -> dict[str, jax.Array]:
    n = self.num_valid.astype(jnp.float32)
    n = jnp.where(n > 0, n, jnp.nan)  # no valid normal: NaN, not a perfect 0 degrees
    # Median: the first bin whose cumulative count reaches half of the pixels, at its centre.
    cumulative = jnp.cumsum(self.histogram)
    median_bin = jnp.argmax(cumulative.astype(jnp.float32) >= n / 2)
    out = {
        "mean_angle": self.angle_sum / n,
        "median_angle": jnp.where(jnp.isnan(n), jnp.nan,
                                  (median_bin + 0.5) * NORMALS_BIN_DEGREES),
        "rmse_angle": jnp.sqrt(self.angle_squared_sum / n),
    }
    for bound, count in zip(NORMALS_ANGLE_BOUNDS, self.within):
      out[f"within_{bound:g}"] = 100.0 * count.astype(jnp.float32) / n
    return out


@flax.struct.dataclass
class EdgeLoss(clu_metrics.Metric):
  """The edge task's online score: its weighted BCE over the pixels of a split (the survey's
  `EdgeMeter`); odsF comes from `iterfuse_jax.boundary_eval` after training.

  Attributes:
    loss_sum: float32 sum over valid pixels of the per-pixel weighted BCE.
    num_valid: int32 number of valid (non-255) pixels.
  """

  loss_sum: jax.Array
  num_valid: jax.Array

  task: ClassVar[str] = "edge"

  @classmethod
  def empty(cls) -> EdgeLoss:
    return cls(loss_sum=jnp.zeros((), jnp.float32), num_valid=jnp.zeros((), jnp.int32))

  @classmethod
  def from_model_output(cls, predictions: Mapping[str, jax.Array],
                        labels: Mapping[str, jax.Array], example_mask: jax.Array | None = None,
                        **_) -> EdgeLoss:
    """predictions[task]: [B, H, W, 1] logits; labels[task]: [B, H, W] in {0, 1}, 255 ignored."""
    logits, label = _task_inputs(cls.task, predictions, labels, 1)
    label = label.astype(jnp.float32)
    x = logits[..., 0].astype(jnp.float32)
    valid = _example_mask(example_mask, label.shape[0])[:, None, None] & (label != IGNORE_LABEL)
    w = jnp.float32(task_registry.get_task(cls.task).loss_options["pos_weight"])
    per_pixel = jnp.where(label >= 0.5, w * jax.nn.softplus(-x), (1 - w) * jax.nn.softplus(x))
    return cls(loss_sum=jnp.sum(jnp.where(valid, per_pixel, 0.0)),
               num_valid=jnp.sum(valid).astype(jnp.int32))

  def merge(self, other: EdgeLoss) -> EdgeLoss:
    return jax.tree.map(jnp.add, self, other)

  def compute(self) -> dict[str, jax.Array]:
    n = self.num_valid.astype(jnp.float32)
    return {"loss": self.loss_sum / jnp.where(n > 0, n, jnp.nan)}


def _metric_class(task: str, dataset: str) -> type[clu_metrics.Metric]:
  """The metric of `task`, specialised to it (its name and, for segmentation, class count)."""
  spec = task_registry.get_task(task)
  attrs = {"task": task, "__annotations__": {}, "__module__": __name__}
  if spec.kind == "segmentation":
    base = ConfusionMatrix
    attrs["num_classes"] = task_registry.num_outputs(task, dataset)
  elif spec.kind == "regression":
    base = DepthErrors
  elif spec.kind == "binary":
    base = SaliencyScores
  elif spec.kind == "normals":
    base = NormalsErrors
  elif spec.kind == "boundary":
    base = EdgeLoss
  else:
    raise ValueError(f"task {task!r} has kind {spec.kind!r}, for which no metric exists")
  name = "".join(p.capitalize() for p in task.split("_")) + base.__name__
  # A struct dataclass again, so that jax treats the subclass as a pytree too.
  return flax.struct.dataclass(type(name, (base,), attrs))


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """A collection with one metric per task; `compute` flattens to "<task>/<name>" keys."""

  def compute(self) -> dict[str, jax.Array]:
    return {f"{task}/{name}": value
            for task, values in super().compute().items() for name, value in values.items()}


@functools.lru_cache(maxsize=None)
def _make_eval_metrics(tasks: tuple[str, ...], dataset: str) -> type[EvalMetrics]:
  tasks = task_registry.validate_tasks(tasks, dataset)
  fields = {task: _metric_class(task, dataset) for task in tasks}
  cls = type(f"EvalMetrics_{dataset}_{'_'.join(tasks)}", (EvalMetrics,),
             {"__annotations__": fields, "__module__": __name__})
  return flax.struct.dataclass(cls)


def make_eval_metrics(tasks: Sequence[str], dataset: str) -> type[EvalMetrics]:
  """The metric collection of `tasks` on `dataset` (cached: equal arguments, same class).

  Use:
    metrics_cls = make_eval_metrics(("semseg", "depth"), "nyud")
    update = metrics_cls.single_from_model_output(
        predictions={task: [B, H, W, C] logits}, labels={task: [B, H, W]}, example_mask=[B])
    merged = update if merged is None else merged.merge(update)
    merged.compute()  # {"semseg/miou": ..., "semseg/pixel_acc": ..., "depth/rmse": ..., ...}

  Keys of `compute()`: "<seg task>/miou", "<seg task>/pixel_acc" (percent); "depth/rmse",
  "depth/log_rmse", "depth/abs_rel"; "sal/max_iou", "sal/max_f" (percent);
  "normals/mean_angle", "normals/median_angle", "normals/rmse_angle" (degrees),
  "normals/within_11.25", "normals/within_22.5", "normals/within_30" (percent); "edge/loss".
  """
  return _make_eval_metrics(tuple(tasks), dataset)


def headline_metrics(results: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float]:
  """The one number per task that enters Delta_m, in the paper's units.

  Args:
    results: the flat output of the collection's `compute()` (e.g. {"semseg/miou": 35.0, ...}).
    tasks: the tasks to report.

  Returns:
    {task: value}: segmentation mIoU (%), depth RMSE (m), saliency maxIoU (%), normals mean
    angular error (degrees), edge odsF (%, from boundary_eval).
  """
  out = {}
  for task in tasks:
    key = headline_key(task)
    if key not in results:
      raise ValueError(f"headline metric {key!r} of task {task!r} is missing from the results "
                       f"(keys: {sorted(results)})")
    out[task] = float(results[key])
  return out


def headline_key(task: str) -> str:
  """The results key of `task`'s headline metric ("semseg/miou", "edge/odsF", ...)."""
  return f"{task}/{_HEADLINE_KEYS[task_registry.get_task(task).metric]}"


def available_delta_m(results: Mapping[str, Any], stl_references: Mapping[str, float],
                      tasks: Sequence[str]) -> tuple[float, tuple[str, ...]]:
  """Delta_m over the tasks that can be scored now, and which those are.

  During training, a task whose headline is computed offline (edge odsF, after training) has no
  value yet, and a task without a single-task reference (normals and edge have none in the
  paper) cannot enter Delta_m; both are left out here, and the caller reports which tasks were
  used. An online task whose headline is missing is an error, as in `headline_metrics`.
  `iterfuse_jax.compare` computes the full Delta_m of finished runs with `delta_m`.

  Returns:
    (Delta_m in percent, the tasks averaged over); (nan, ()) when no task qualifies.
  """
  measured = [t for t in tasks
              if not task_registry.get_task(t).offline_metric or headline_key(t) in results]
  headline = headline_metrics(results, measured)  # raises for a missing online headline
  usable = tuple(t for t in measured if t in stl_references)
  if not usable:
    return float("nan"), ()
  return delta_m(headline, stl_references, usable), usable


def delta_m(headline: Mapping[str, float], stl_references: Mapping[str, float],
            tasks: Sequence[str]) -> float:
  """Multi-task performance Delta_m in percent (the paper's formula).

  Delta_m = (1/T) sum_t (-1)^{l_t} (M_t - M_stl,t) / M_stl,t * 100, with l_t = 1 when lower is
  better for task t (depth RMSE, normals mean angle), so any improvement over the single-task
  model is positive.

  Args:
    headline: {task: metric} from `headline_metrics`.
    stl_references: {task: the single-task model's metric}, same units.
    tasks: the tasks to average over.
  """
  tasks = tuple(tasks)
  if not tasks:
    raise ValueError("delta_m needs at least one task")
  total = 0.0
  for task in tasks:
    if task not in headline:
      raise ValueError(f"delta_m: no metric for task {task!r} (have {sorted(headline)})")
    if task not in stl_references:
      raise ValueError(f"delta_m: no single-task reference for task {task!r} (have "
                       f"{sorted(stl_references)}); set config.stl_references.{task}")
    reference = float(stl_references[task])
    if reference == 0:
      raise ValueError(f"delta_m: the single-task reference of {task!r} is 0")
    sign = 1.0 if task_registry.get_task(task).higher_is_better else -1.0
    total += sign * (float(headline[task]) - reference) / reference
  return 100.0 * total / len(tasks)
