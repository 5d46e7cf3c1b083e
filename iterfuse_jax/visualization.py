"""Pictures of inputs, labels and predictions: uint8 RGB arrays for TensorBoard and PNG files.

NumPy only (no plotting library). Colours:
  * segmentation: the PASCAL VOC palette (background black). PASCAL semseg and human parts use
    entries 0..C-1 (the colours of the datasets' own palette PNGs); NYUD-v2 has no background
    class, so its 40 classes use entries 1..40 and no class is black. Ignored pixels (255) are
    white, a colour no class has.
  * depth: a dark-purple -> blue -> green -> yellow ramp, near = bright; invalid (<= 0) black.
  * saliency and edges: grey level = probability (0 black, 1 white); ignored pixels (255) dark
    blue.
  * normals: the usual (n + 1) / 2 -> RGB picture of the unit vector (x red, y green, z blue);
    invalid (all-zero) pixels black.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from iterfuse_jax import tasks as task_registry
from iterfuse_jax.tasks import IGNORE_LABEL

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IGNORE_RGB = (255, 255, 255)
INVALID_DEPTH_RGB = (0, 0, 0)
SALIENCY_IGNORE_RGB = (0, 0, 128)
# Fixed depth range (metres) for `task_to_rgb`, so that ground truth and prediction share a scale;
# it covers nearly all NYUD-v2 readings.
DEPTH_RANGE = {"nyud": (0.5, 7.0)}

PASCAL_VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
NYUD_40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
HUMAN_PARTS_CLASSES = (
    "background", "head", "torso", "upper arms", "lower arms and hands", "upper legs",
    "lower legs and feet")

# Anchor colours of the depth ramp, evenly spaced from 0 (far) to 1 (near).
_DEPTH_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def voc_palette(num_entries: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map, [num_entries, 3] uint8.

  Entry i spreads the bits of i over the channels: bit 3k of i goes to red, 3k+1 to green, 3k+2
  to blue, each at bit position 7 - k of its channel (so 1 -> dark red, 2 -> dark green, ...).
  """
  index = np.arange(num_entries)
  palette = np.zeros((num_entries, 3), np.int64)
  for k in range(8):
    for channel in range(3):
      bit = (index >> (3 * k + channel)) & 1
      palette[:, channel] |= bit << (7 - k)
  return palette.astype(np.uint8)


def class_names(task: str, dataset: str) -> tuple[str, ...]:
  """Names of the classes of segmentation task `task` on `dataset`, index = class id."""
  task_registry.num_outputs(task, dataset)  # validates the pair
  if task == "human_parts":
    return HUMAN_PARTS_CLASSES
  if task == "semseg":
    return NYUD_40_CLASSES if dataset == "nyud" else PASCAL_VOC_CLASSES
  raise ValueError(f"task {task!r} is not a segmentation task; it has no class names")


def segmentation_palette(task: str, dataset: str) -> np.ndarray:
  """[C, 3] uint8 colour of each class of `task` on `dataset`."""
  num_classes = len(class_names(task, dataset))
  offset = 1 if dataset == "nyud" else 0  # keep black out of NYUD's background-free classes
  return voc_palette(num_classes + offset)[offset:]


def colorize_segmentation(labels: np.ndarray, task: str = "semseg",
                          dataset: str = "pascal") -> np.ndarray:
  """Class ids [..., H, W] (int) -> uint8 RGB [..., H, W, 3]; 255 (ignore) is white.

  Raises ValueError for ids that are neither a class of the task nor 255.
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"colorize_segmentation expects integer class ids, got dtype {labels.dtype}")
  palette = segmentation_palette(task, dataset)
  ignore = labels == IGNORE_LABEL
  bad = ~ignore & ((labels < 0) | (labels >= len(palette)))
  if bad.any():
    raise ValueError(f"{task} on {dataset}: class ids {np.unique(labels[bad]).tolist()} are "
                     f"outside [0, {len(palette)}) and not {IGNORE_LABEL}")
  rgb = palette[np.where(ignore, 0, labels)]
  rgb[ignore] = IGNORE_RGB
  return rgb


def colorize_depth(depth: np.ndarray, vmin: float | None = None,
                   vmax: float | None = None) -> np.ndarray:
  """Depth [..., H, W] (metres) -> uint8 RGB [..., H, W, 3]; near is bright, invalid black.

  Args:
    depth: depth map(s); values <= 0 or not finite are invalid (no reading).
    vmin, vmax: the depth range mapped onto the colour ramp (values outside are clipped); when
      None, the 2nd / 98th percentile of the valid values of the whole array.
  """
  depth = np.asarray(depth, np.float64)
  valid = np.isfinite(depth) & (depth > 0)
  if vmin is None or vmax is None:
    values = depth[valid]
    low, high = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
    vmin = low if vmin is None else vmin
    vmax = high if vmax is None else vmax
  scale = max(float(vmax) - float(vmin), 1e-6)
  nearness = 1.0 - np.clip((np.where(valid, depth, vmax) - vmin) / scale, 0.0, 1.0)
  rgb = _ramp(nearness)
  rgb[~valid] = INVALID_DEPTH_RGB
  return rgb


def _ramp(t: np.ndarray) -> np.ndarray:
  """t in [0, 1] -> uint8 colours, piecewise linear between `_DEPTH_ANCHORS`."""
  position = t * (len(_DEPTH_ANCHORS) - 1)
  low = np.clip(np.floor(position).astype(np.int64), 0, len(_DEPTH_ANCHORS) - 2)
  frac = (position - low)[..., None]
  rgb = (1 - frac) * _DEPTH_ANCHORS[low] + frac * _DEPTH_ANCHORS[low + 1]
  return np.round(rgb).astype(np.uint8)


def colorize_saliency(prob: np.ndarray) -> np.ndarray:
  """Probabilities or {0, 1} labels [..., H, W] -> grey uint8 RGB [..., H, W, 3].

  255 (ignore) is shown dark blue; other values are clipped to [0, 1].
  """
  prob = np.asarray(prob, np.float64)
  ignore = prob == IGNORE_LABEL
  grey = np.round(np.clip(np.where(ignore, 0.0, prob), 0.0, 1.0) * 255).astype(np.uint8)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  rgb[ignore] = SALIENCY_IGNORE_RGB
  return rgb


def colorize_normals(normals: np.ndarray) -> np.ndarray:
  """Normals [..., H, W, 3] (any length; all-zero = invalid) -> uint8 RGB [..., H, W, 3]:
  round(255 * (n / |n| + 1) / 2), invalid pixels black."""
  normals = np.asarray(normals, np.float64)
  if normals.shape[-1] != 3:
    raise ValueError(f"colorize_normals expects [..., H, W, 3], got shape {normals.shape}")
  norm = np.linalg.norm(normals, axis=-1, keepdims=True)
  valid = norm > 0
  unit = normals / np.where(valid, norm, 1.0)
  rgb = np.round(np.clip((unit + 1.0) / 2.0, 0.0, 1.0) * 255).astype(np.uint8)
  return np.where(valid, rgb, 0).astype(np.uint8)


def denormalize_image(x: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """Undoes ImageNet normalisation: [..., H, W, 3] float ((rgb/255 - mean) / std) -> uint8."""
  x = np.asarray(x, np.float64)
  if x.shape[-1] != 3:
    raise ValueError(f"denormalize_image expects [..., H, W, 3], got shape {x.shape}")
  rgb = (x * np.asarray(std) + np.asarray(mean)) * 255.0
  return np.round(np.clip(rgb, 0, 255)).astype(np.uint8)


def task_to_rgb(task: str, dataset: str, x: np.ndarray, is_prediction: bool) -> np.ndarray:
  """A batch of one task's predictions or labels as uint8 RGB [B, H, W, 3].

  Args:
    task: registry name ("semseg", "depth", "human_parts", "sal", "normals", "edge").
    dataset: "nyud" or "pascal" (palette, class count, depth range).
    x: if `is_prediction`, the network's output [B, H, W, C] (segmentation: logits, shown by
      argmax; depth: metres in channel 0; saliency and edge: a logit, shown as its sigmoid;
      normals: 3 channels, normalised). Otherwise [B, H, W] labels or post-processed predictions
      (segmentation: class ids, 255 ignored; depth: metres, 0 invalid; saliency and edge: {0, 1}
      labels or probabilities, 255 ignored; normals: [B, H, W, 3], all-zero invalid).
    is_prediction: which of the two `x` is.
  """
  spec = task_registry.get_task(task)
  channels = task_registry.num_outputs(task, dataset)
  x = np.asarray(x)
  if spec.kind == "normals":
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"{task} {'prediction' if is_prediction else 'labels'} must be "
                       f"[B, H, W, 3], got shape {x.shape}")
    return colorize_normals(x)
  if is_prediction:
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"{task} prediction must be [B, H, W, {channels}], got shape {x.shape}")
    if spec.kind == "segmentation":
      x = x.argmax(-1)
    elif spec.kind in ("binary", "boundary"):
      x = 1.0 / (1.0 + np.exp(-x[..., 0].astype(np.float64)))
    else:
      x = x[..., 0]
  else:
    if x.ndim == 4 and x.shape[-1] == 1:
      x = x[..., 0]
    if x.ndim != 3:
      raise ValueError(f"{task} labels must be [B, H, W], got shape {x.shape}")
  if spec.kind == "segmentation":
    return colorize_segmentation(x.astype(np.int64), task, dataset)
  if spec.kind in ("binary", "boundary"):
    return colorize_saliency(x)
  if spec.kind == "regression":
    vmin, vmax = DEPTH_RANGE.get(dataset, (None, None))
    return colorize_depth(x, vmin, vmax)
  raise ValueError(f"task {task!r} has kind {spec.kind!r}, which cannot be drawn")


def palettes() -> Mapping[str, np.ndarray]:
  """{"<dataset>/<task>": [C, 3] uint8} for every segmentation task of every dataset."""
  return {f"{dataset}/{task}": segmentation_palette(task, dataset)
          for task, spec in task_registry.TASKS.items() if spec.kind == "segmentation"
          for dataset in spec.num_outputs}
