"""Per-task training losses and the weighted multi-task sum (deep supervision included).

All losses are pure `jax.numpy` functions of logits at label resolution ([B, H, W, C], NHWC) and
labels ([B, H, W]); they compute in at least float32 whatever the logits' dtype, are jit-friendly (no
data-dependent shapes) and return 0, not NaN, when a batch has no valid pixel for a task.

Conventions (the MTL survey code of Vandenhende et al., see ../shared/REFERENCE.md):
  * segmentation (semseg, human_parts): softmax cross-entropy, label 255 ignored, mean over the
    valid pixels of the whole batch (PyTorch `CrossEntropyLoss(ignore_index=255)`).
  * depth: L1 over the valid pixels of the batch; a label of 0 (no sensor reading) or 255 is
    invalid.
  * saliency: class-balanced binary cross-entropy. With w = (#negatives / #valid) over the batch,
    loss = (w * sum_pos BCE + (1 - w) * sum_neg BCE) / #valid: positives, usually the minority,
    are weighted by the fraction of negatives. Labels are {0, 1} (>= 0.5 is positive), 255 is
    ignored; without ignored pixels this is exactly the survey's `BalancedCrossEntropyLoss`.
    Like it, a batch without any positive pixel has w = 1 and so a loss of 0 (HED-style
    weighting: all weight goes to the positives).
  * edge: the same binary cross-entropy with a fixed positive weight w (the survey's `edge_w`,
    0.95): (w * sum_pos BCE + (1 - w) * sum_neg BCE) / #valid. The survey divides by all pixels of
    the batch; its edge labels have no ignored pixels, so this is the same loss.
  * normals: the prediction is normalised to unit length (x / (|x| + 1e-12)), then L1 against the
    unit ground truth, averaged over the valid pixels' 3 components (the survey's
    `NormalsLoss(normalize=True, norm=1)`); a label whose 3 components are all 0 is invalid
    (the survey marks such pixels 255 in every component and masks them).
  * multi-task: total = sum over supervision levels (the "initial" intermediate predictions,
    MTI-Net's coarser-scale ones "initial_scale1".."initial_scale3", and the "final" predictions)
    and tasks of weight[task] * loss; the intermediate predictions get the same losses and
    weights as the final ones (the survey code's PAD-Net / MTI-Net convention).
  * ATRC's auxiliary label predictions (level "aux", only the tasks whose class probabilities
    a label context uses) are classifications of every task, with ATRC's losses (`aux_loss`)
    and the task's weight: segmentation cross-entropy; saliency two-class cross-entropy with
    the batch-balanced class weights (1 - w, w), w = #negatives / #valid; edge two-class
    cross-entropy with class weights (1 - edge_w, edge_w); depth cross-entropy over 40 bins
    uniform in log depth from 0.7 m to 10 m (below and above clipped to the end bins), depth 0
    and 255 ignored. Each is divided by the number of valid pixels.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from iterfuse_jax import tasks as task_registry
from iterfuse_jax.precision import accumulation_dtype
from iterfuse_jax.tasks import IGNORE_LABEL

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
# Supervision levels of the network's output dict, in the order their losses are summed:
# "final", and every deep-supervision level, whose name starts with "initial".
FINAL_LEVEL = "final"
DEEP_SUPERVISION_PREFIX = "initial"
# ATRC's auxiliary label predictions: their own losses (aux_loss), for the tasks present.
AUX_LEVEL = "aux"


def supervision_levels(outputs: Mapping[str, object]) -> list[str]:
  """The levels of `outputs` the loss supervises, deep-supervision levels (sorted) then "final".

  Raises a ValueError for a level that is neither.
  """
  unknown = sorted(k for k in outputs if k not in (FINAL_LEVEL, AUX_LEVEL)
                   and not k.startswith(DEEP_SUPERVISION_PREFIX))
  if unknown:
    raise ValueError(f"multitask_loss: unknown output levels {unknown}; expected 'final', "
                     f"'{AUX_LEVEL}' and levels named '{DEEP_SUPERVISION_PREFIX}*'")
  if FINAL_LEVEL not in outputs:
    raise ValueError(f"multitask_loss: outputs have no 'final' predictions (keys: "
                     f"{sorted(outputs)})")
  return sorted(k for k in outputs if k != FINAL_LEVEL) + [FINAL_LEVEL]


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, and 0 (with zero gradient) when count is 0."""
  return total / jnp.maximum(count, 1).astype(total.dtype)


def _check_spatial(logits: jax.Array, labels: jax.Array, name: str) -> jax.Array:
  """Returns labels as [B, H, W]; raises if they do not match the logits' [B, H, W]."""
  if logits.ndim != 4:
    raise ValueError(f"{name}: logits must be [B, H, W, C], got shape {logits.shape}")
  if labels.ndim == 4 and labels.shape[-1] == 1:
    labels = labels[..., 0]
  if labels.shape != logits.shape[:3]:
    raise ValueError(
        f"{name}: labels of shape {labels.shape} do not match logits of shape {logits.shape}; "
        "expected labels [B, H, W] at the logits' resolution")
  return labels


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy averaged over the non-ignored pixels of the batch.

  Args:
    logits: [B, H, W, C] class scores (any float dtype).
    labels: [B, H, W] integer class ids in [0, C); IGNORE_LABEL (255) marks unlabelled pixels.
      A label outside [0, C) that is not 255 makes the loss NaN (data error, caught by the
      trainer's non-finite guard) rather than being skipped silently.

  Returns:
    Scalar float32 loss; 0 when every pixel is ignored.
  """
  labels = _check_spatial(logits, labels, "cross_entropy")
  labels = labels.astype(jnp.int32)
  valid = labels != IGNORE_LABEL
  log_probs = jax.nn.log_softmax(logits.astype(accumulation_dtype(logits.dtype)), axis=-1)
  safe_labels = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return _safe_mean(jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid))


def l1(predictions: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean absolute error over the valid depth pixels of the batch.

  Args:
    predictions: [B, H, W, 1] predicted depth (metres).
    labels: [B, H, W] (or [B, H, W, 1]) depth in metres; 0 (no reading) and 255 are invalid.

  Returns:
    Scalar float32 loss; 0 when no pixel is valid.
  """
  if predictions.ndim != 4 or predictions.shape[-1] != 1:
    raise ValueError(f"l1: predictions must be [B, H, W, 1], got shape {predictions.shape}")
  acc = accumulation_dtype(predictions.dtype)
  labels = _check_spatial(predictions, labels, "l1").astype(acc)
  valid = (labels > 0) & (labels != IGNORE_LABEL)
  error = jnp.abs(predictions[..., 0].astype(acc) - labels)
  return _safe_mean(jnp.sum(jnp.where(valid, error, 0.0)), jnp.sum(valid))


def _weighted_bce(logits: jax.Array, labels: jax.Array, pos_weight: float | None,
                  name: str) -> jax.Array:
  """(w sum_pos -log p + (1 - w) sum_neg -log(1 - p)) / #valid; w = pos_weight, or the batch's
  fraction of negatives when None."""
  if logits.ndim != 4 or logits.shape[-1] != 1:
    raise ValueError(f"{name}: logits must be [B, H, W, 1], got shape {logits.shape}")
  acc = accumulation_dtype(logits.dtype)
  labels = _check_spatial(logits, labels, name).astype(acc)
  x = logits[..., 0].astype(acc)
  valid = labels != IGNORE_LABEL
  positive = valid & (labels >= 0.5)
  negative = valid & ~positive
  num_valid = jnp.sum(valid).astype(acc)
  if pos_weight is None:
    weight_pos = _safe_mean(jnp.sum(negative), num_valid)
  else:
    weight_pos = jnp.asarray(pos_weight, acc)
  # -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), both overflow-free.
  loss_pos = jnp.sum(jnp.where(positive, jax.nn.softplus(-x), 0.0))
  loss_neg = jnp.sum(jnp.where(negative, jax.nn.softplus(x), 0.0))
  return _safe_mean(weight_pos * loss_pos + (1.0 - weight_pos) * loss_neg, num_valid)


def balanced_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Class-balanced binary cross-entropy (the survey's saliency loss).

  Args:
    logits: [B, H, W, 1] saliency logits.
    labels: [B, H, W] (or [B, H, W, 1]) targets in {0, 1} (>= 0.5 counts as positive);
      IGNORE_LABEL (255) marks pixels that are left out.

  Returns:
    Scalar float32 loss: (w * sum over positives of -log p + (1 - w) * sum over negatives of
    -log(1 - p)) / #valid, with w = #negatives / #valid over the whole batch; 0 when no pixel is
    valid.
  """
  return _weighted_bce(logits, labels, None, "balanced_bce")


def weighted_bce(logits: jax.Array, labels: jax.Array, pos_weight: float) -> jax.Array:
  """Binary cross-entropy with a fixed positive weight (the survey's edge loss, `edge_w` 0.95).

  Args:
    logits: [B, H, W, 1] edge logits.
    labels: [B, H, W] (or [B, H, W, 1]) targets in {0, 1} (>= 0.5 counts as positive);
      IGNORE_LABEL (255) marks pixels that are left out (only the padding of eval canvases).
    pos_weight: w in [0, 1], the weight of the positives (negatives get 1 - w).

  Returns:
    Scalar float32 loss (w * sum_pos -log p + (1 - w) * sum_neg -log(1 - p)) / #valid; 0 when no
    pixel is valid.
  """
  if not 0.0 <= pos_weight <= 1.0:
    raise ValueError(f"weighted_bce: pos_weight must be in [0, 1], got {pos_weight}")
  return _weighted_bce(logits, labels, pos_weight, "weighted_bce")


def valid_normals(labels: jax.Array) -> jax.Array:
  """[B, H, W] bool: normal labels [B, H, W, 3] that are not the all-zero invalid marker."""
  return jnp.any(labels != 0, axis=-1)


def normalize_normals(x: jax.Array) -> jax.Array:
  """[..., 3] -> unit length along the last axis (x / (|x| + 1e-12), as the survey)."""
  x = x.astype(accumulation_dtype(x.dtype))
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def normals_l1(predictions: jax.Array, labels: jax.Array) -> jax.Array:
  """L1 between the unit-normalised prediction and the ground-truth normal, over valid pixels.

  Args:
    predictions: [B, H, W, 3] raw network output (normalised here).
    labels: [B, H, W, 3] unit normals; pixels whose 3 components are all 0 are invalid.

  Returns:
    Scalar float32: sum over valid pixels and the 3 components of |n_pred - n_gt| divided by
    3 * #valid pixels (the survey's per-element mean); 0 when no pixel is valid.
  """
  if predictions.ndim != 4 or predictions.shape[-1] != 3:
    raise ValueError(f"normals_l1: predictions must be [B, H, W, 3], got {predictions.shape}")
  if labels.shape != predictions.shape:
    raise ValueError(f"normals_l1: labels of shape {labels.shape} do not match predictions of "
                     f"shape {predictions.shape}; expected [B, H, W, 3] unit normals")
  labels = labels.astype(accumulation_dtype(predictions.dtype))
  valid = valid_normals(labels)
  error = jnp.sum(jnp.abs(normalize_normals(predictions) - labels), axis=-1)
  return _safe_mean(jnp.sum(jnp.where(valid, error, 0.0)), 3 * jnp.sum(valid))


LOSSES: Mapping[str, Callable[..., jax.Array]] = {
    "cross_entropy": cross_entropy,
    "l1": l1,
    "balanced_bce": balanced_bce,
    "weighted_bce": weighted_bce,
    "normals_l1": normals_l1,
}


def two_class_cross_entropy(logits: jax.Array, labels: jax.Array,
                            pos_weight: float | None) -> jax.Array:
  """Two-class softmax cross-entropy with class weights (1 - w, w), over the valid pixels.

  Args:
    logits: [B, H, W, 2] scores of (negative, positive).
    labels: [B, H, W] (or [B, H, W, 1]) targets in {0, 1} (>= 0.5 counts as positive);
      IGNORE_LABEL (255) marks pixels that are left out.
    pos_weight: w, the positives' class weight; None takes the batch's fraction of negatives
      among the valid pixels (ATRC's balanced saliency loss).

  Returns:
    Scalar float32 loss (w * sum_pos -log p_1 + (1 - w) * sum_neg -log p_0) / #valid (PyTorch's
    weighted `cross_entropy` summed, then divided by the pixel count, as ATRC does); 0 when no
    pixel is valid.
  """
  if logits.ndim != 4 or logits.shape[-1] != 2:
    raise ValueError(f"two_class_cross_entropy: logits must be [B, H, W, 2], got shape "
                     f"{logits.shape}")
  acc = accumulation_dtype(logits.dtype)
  labels = _check_spatial(logits, labels, "two_class_cross_entropy").astype(acc)
  valid = labels != IGNORE_LABEL
  positive = valid & (labels >= 0.5)
  negative = valid & ~positive
  num_valid = jnp.sum(valid).astype(acc)
  if pos_weight is None:
    weight_pos = _safe_mean(jnp.sum(negative).astype(acc), num_valid)
  else:
    weight_pos = jnp.asarray(pos_weight, acc)
  log_probs = jax.nn.log_softmax(logits.astype(acc), axis=-1)
  loss_pos = jnp.sum(jnp.where(positive, -log_probs[..., 1], 0.0))
  loss_neg = jnp.sum(jnp.where(negative, -log_probs[..., 0], 0.0))
  return _safe_mean(weight_pos * loss_pos + (1.0 - weight_pos) * loss_neg, num_valid)


def depth_bins(depth: jax.Array, num_bins: int = task_registry.AUX_DEPTH_BINS,
               depth_range: tuple[float, float] = task_registry.AUX_DEPTH_RANGE) -> jax.Array:
  """Depth [B, H, W] in metres -> int32 bin ids, uniform in log depth over `depth_range`.

  bin = floor(num_bins * log(d / lo) / log(hi / lo)), clipped to [0, num_bins - 1]; invalid
  depth (0, 255, not finite) -> IGNORE_LABEL.
  """
  lo, hi = depth_range
  d = depth.astype(jnp.float32)
  valid = (d > 0) & (d != IGNORE_LABEL) & jnp.isfinite(d)
  safe = jnp.where(valid, d, lo)
  bins = jnp.floor(num_bins * jnp.log(safe / lo) / jnp.log(hi / lo))
  bins = jnp.clip(bins, 0, num_bins - 1).astype(jnp.int32)
  return jnp.where(valid, bins, IGNORE_LABEL)


def aux_loss(task: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """ATRC's loss of the auxiliary label prediction of `task` (logits [B, H, W, K] at label size)."""
  spec = task_registry.get_task(task)
  if spec.kind == "segmentation":
    return cross_entropy(logits, labels)
  if spec.kind == "binary":
    return two_class_cross_entropy(logits, labels, None)
  if spec.kind == "boundary":
    return two_class_cross_entropy(logits, labels, spec.loss_options["pos_weight"])
  if spec.kind == "regression":
    if logits.shape[-1] != task_registry.AUX_DEPTH_BINS:
      raise ValueError(f"aux_loss: {task} logits must have {task_registry.AUX_DEPTH_BINS} bins, "
                       f"got shape {logits.shape}")
    return cross_entropy(logits, depth_bins(_check_spatial(logits, labels, "aux_loss")))
  raise ValueError(f"aux_loss: task {task!r} (kind {spec.kind!r}) has no auxiliary label loss")


def task_loss(task: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The registry's loss of `task` (tasks.TaskSpec.loss, with its loss_options) on logits
  [B, H, W, C] at label size."""
  spec = task_registry.get_task(task)
  if spec.loss not in LOSSES:
    raise ValueError(f"task {task!r} asks for loss {spec.loss!r}; known losses: "
                     f"{sorted(LOSSES)}")
  return LOSSES[spec.loss](logits, labels, **spec.loss_options)


def _to_label_size(logits: jax.Array, label_hw: tuple[int, ...]) -> jax.Array:
  """Bilinearly resizes [B, h, w, C] logits to the labels' (H, W) when they differ."""
  if tuple(logits.shape[1:3]) == tuple(label_hw):
    return logits
  return jax.image.resize(logits.astype(accumulation_dtype(logits.dtype)),
                          (logits.shape[0], *label_hw, logits.shape[-1]),
                          method="bilinear", antialias=False)


def multitask_loss(
    outputs: Mapping[str, Mapping[str, jax.Array]],
    batch: Mapping[str, jax.Array],
    tasks: Sequence[str],
    weights: Mapping[str, float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of every task's loss over the supervision levels present in `outputs`.

  Args:
    outputs: {"final": {task: [B, H, W, C_task]}} and optionally deep-supervision levels
      {"initial": {...}, "initial_scale1": {...}, ...} (intermediate predictions) and ATRC's
      {"aux": {task: [B, H, W, K_task]}} for some of the tasks (see `aux_loss`). Predictions at
      another resolution than the labels are bilinearly resized to the label size first.
    batch: holds each task's labels under the task's name ([B, H, W]; normals [B, H, W, 3]).
    tasks: the tasks to supervise.
    weights: task -> loss weight; None takes the registry's (semseg 1, depth 1, human_parts 2,
      sal 5, normals 10, edge 50).

  Returns:
    (total, parts): total = sum over levels and tasks of weights[task] * loss, float32 scalar;
    parts = {"<level>/<task>": unweighted loss, ..., "total": total}.
  """
  levels = supervision_levels(outputs)
  tasks = tuple(tasks)
  if weights is None:
    weights = {t: task_registry.get_task(t).loss_weight for t in tasks}
  missing = [t for t in tasks if t not in weights]
  if missing:
    raise ValueError(f"multitask_loss: no loss weight for tasks {missing} (weights given for "
                     f"{sorted(weights)})")
  missing = [t for t in tasks if t not in batch]
  if missing:
    raise ValueError(f"multitask_loss: the batch has no labels for tasks {missing} (batch keys: "
                     f"{sorted(batch)})")

  parts = {}
  total = jnp.zeros((), jnp.float32)
  for level in levels:
    if level == AUX_LEVEL:
      extra = sorted(set(outputs[level]) - set(tasks))
      if extra:
        raise ValueError(f"multitask_loss: outputs[{level!r}] has predictions for {extra}, "
                         f"which are not among the tasks {list(tasks)}")
    for task in tasks:
      if level == AUX_LEVEL and task not in outputs[level]:
        continue  # only the tasks whose label probabilities ATRC uses have one
      if task not in outputs[level]:
        raise ValueError(f"multitask_loss: outputs[{level!r}] has no prediction for task "
                         f"{task!r} (has {sorted(outputs[level])})")
      labels = batch[task]
      logits = _to_label_size(outputs[level][task], labels.shape[1:3])
      if level == AUX_LEVEL:
        loss = aux_loss(task, logits, labels)
      else:
        loss = task_loss(task, logits, labels)
      parts[f"{level}/{task}"] = loss
      total = total + jnp.float32(weights[task]) * loss
  parts["total"] = total
  return total, parts
