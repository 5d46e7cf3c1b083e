"""Augmentations and preprocessing on numpy examples, and the grain transforms that apply them.

An example is a dict of numpy arrays: "image" uint8 [H, W, 3]; class maps ("semseg",
"human_parts", "sal") uint8 [H, W] with 255 = ignore; "depth" float32 [H, W] in metres with
0 = invalid. Geometric operations resample the image bicubically and every label with nearest
neighbours (labels are never interpolated), through the same coordinate mapping, so image and
labels stay aligned. Randomness comes only from the `np.random.Generator` that grain derives from
the pipeline seed and the record index.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from data_pipelines.normalization import IMAGENET_MEAN, IMAGENET_STD

CLASS_TASKS = ("semseg", "human_parts", "sal")
DENSE_TASKS = CLASS_TASKS + ("depth",)
IGNORE_LABEL = 255
INVALID_DEPTH = 0.0


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Ranges of the training augmentations (the survey code's values are the config defaults).

  Attributes:
    flip_probability: chance of a horizontal flip.
    zoom_scales: discrete zooms about the centre (NYUD-v2: 1.0, 1.2, 1.5); output size unchanged,
      depth divided by the zoom.
    max_rotation: rotation uniform in [-max_rotation, max_rotation] degrees (PASCAL: 20).
    scale_range: continuous scale about the centre, uniform in the range (PASCAL: 0.75..1.25).
  """
  flip_probability: float = 0.5
  zoom_scales: tuple[float, ...] = (1.0,)
  max_rotation: float = 0.0
  scale_range: tuple[float, float] = (1.0, 1.0)


def _to_pil(array: np.ndarray, task: str) -> Image.Image:
  if task == "depth":
    return Image.fromarray(np.ascontiguousarray(array, np.float32), mode="F")
  return Image.fromarray(np.ascontiguousarray(array))


def _resample(task: str) -> Image.Resampling:
  return Image.Resampling.BICUBIC if task == "image" else Image.Resampling.NEAREST


def hflip(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Mirrors the image and every dense label left-right."""
  out = dict(example)
  for key in ("image", *DENSE_TASKS):
    if key in out:
      out[key] = np.ascontiguousarray(out[key][:, ::-1])
  return out


def centre_zoom(example: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
  """Zooms in about the centre by `scale` >= 1, keeping the size; depth is divided by `scale`.

  The central (H / scale) x (W / scale) window is resampled to H x W: objects look `scale` times
  closer, hence the depth division (the survey code's NYUD-v2 augmentation).
  """
  if scale == 1.0:
    return dict(example)
  height, width = example["image"].shape[:2]
  crop_h, crop_w = height / scale, width / scale
  top, left = (height - crop_h) / 2, (width - crop_w) / 2
  box = (left, top, left + crop_w, top + crop_h)
  out = dict(example)
  for key in ("image", *DENSE_TASKS):
    if key in out:
      resized = _to_pil(out[key], key).resize((width, height), _resample(key), box=box)
      out[key] = np.asarray(resized)
  if "depth" in out:
    out["depth"] = out["depth"] / np.float32(scale)
  return out


def rotate_scale(example: Mapping[str, np.ndarray], angle: float,
                 scale: float) -> dict[str, np.ndarray]:
  """Rotates by `angle` degrees and scales by `scale` about the centre, keeping the size.

  Uncovered borders are filled with 0 in the image and every label (as the survey code's
  ScaleNRotate does), except that a label map that is entirely ignore stays entirely ignore.
  Depth, if present, is divided by `scale`.
  """
  if angle == 0.0 and scale == 1.0:
    return dict(example)
  height, width = example["image"].shape[:2]
  cx, cy = width / 2, height / 2
  cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
  # PIL maps each output point back into the input: the inverse of p' = s R (p - c) + c.
  a, b, d, e = cos / scale, -sin / scale, sin / scale, cos / scale
  coefficients = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
  out = dict(example)
  for key in ("image", *DENSE_TASKS):
    if key not in out:
      continue
    if key in CLASS_TASKS and np.all(out[key] == IGNORE_LABEL):
      continue
    fill = (0, 0, 0) if key == "image" else 0
    warped = _to_pil(out[key], key).transform(
        (width, height), Image.Transform.AFFINE, coefficients, _resample(key), fillcolor=fill)
    out[key] = np.asarray(warped)
  if "depth" in out:
    out["depth"] = out["depth"] / np.float32(scale)
  return out


def resize(example: Mapping[str, np.ndarray], size: Sequence[int],
           keys: Sequence[str] = ("image", *DENSE_TASKS)) -> dict[str, np.ndarray]:
  """Resizes the entries `keys` to (height, width) = `size` (image bicubic, labels nearest)."""
  height, width = size
  out = dict(example)
  for key in keys:
    if key in out and out[key].shape[:2] != (height, width):
      out[key] = np.asarray(_to_pil(out[key], key).resize((width, height), _resample(key)))
  return out


_NORM_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_NORM_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3]: (image / 255 - ImageNet mean) / ImageNet std."""
  out = image.astype(np.float32)
  # In place, as one scale and one shift: this is a hot loop of the input pipeline.
  out *= _NORM_SCALE
  out -= _NORM_OFFSET
  return out


def pad_to_canvas(label: np.ndarray, size: Sequence[int], fill: float) -> np.ndarray:
  """Places `label` [h, w] top-left in a [H, W] canvas filled with `fill`."""
  height, width = label.shape[:2]
  if height > size[0] or width > size[1]:
    raise ValueError(f"a {height}x{width} label does not fit the eval_label_size canvas "
                     f"{size[0]}x{size[1]}; raise config.dataset.eval_label_size")
  canvas = np.full(tuple(size), fill, label.dtype)
  canvas[:height, :width] = label
  return canvas


def decode(record: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, np.ndarray]:
  """The arrays of a prepared record: labels squeezed to [H, W]."""
  example = {"image": np.asarray(record["image"], np.uint8)}
  for task in tasks:
    label = np.asarray(record[task])
    example[task] = label[..., 0] if label.ndim == 3 else label
  return example


def finalize(example: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, np.ndarray]:
  """The batch dtypes: image float32 normalised, class maps int32, depth float32."""
  out = {"image": normalize_image(example["image"])}
  for task in tasks:
    out[task] = example[task].astype(np.float32 if task == "depth" else np.int32)
  return out


class TrainTransform(grain.transforms.RandomMap):
  """Reference training augmentation, resize to the training size, normalisation."""

  def __init__(self, tasks: Sequence[str], size: Sequence[int], params: AugmentParams | None):
    """Args: tasks whose labels are kept; (height, width); augmentation ranges (None: none)."""
    self.tasks = tuple(tasks)
    self.size = tuple(size)
    self.params = params

  def augment(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    p = self.params
    # Every draw happens whatever the outcome, so that one record always consumes the same stream.
    flip = rng.random() < p.flip_probability
    angle = rng.uniform(-p.max_rotation, p.max_rotation)
    scale = rng.uniform(*p.scale_range)
    zoom = float(p.zoom_scales[rng.integers(len(p.zoom_scales))])
    if flip:
      example = hflip(example)
    example = rotate_scale(example, angle, scale)
    return centre_zoom(example, zoom)

  def random_map(self, element: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict:
    example = decode(element, self.tasks)
    if self.params is not None:
      example = self.augment(example, rng)
    return finalize(resize(example, self.size), self.tasks)


class EvalTransform(grain.transforms.Map):
  """Image resized to the eval size; labels kept at their original size, padded into a canvas."""

  def __init__(self, tasks: Sequence[str], size: Sequence[int], label_size: Sequence[int]):
    self.tasks = tuple(tasks)
    self.size = tuple(size)
    self.label_size = tuple(label_size)

  def map(self, element: Mapping[str, np.ndarray]) -> dict:
    example = decode(element, self.tasks)
    original = example["image"].shape[:2]
    out = finalize(resize(example, self.size, keys=("image",)), self.tasks)
    for task in self.tasks:
      fill = INVALID_DEPTH if task == "depth" else IGNORE_LABEL
      out[task] = pad_to_canvas(out[task], self.label_size, fill)
    out["original_size"] = np.array(original, np.int32)
    out["example_mask"] = np.array(True)
    image_id = element["image_id"]
    out["image_id"] = np.array(image_id.decode() if isinstance(image_id, bytes) else str(image_id))
    return out
