"""Augmentations and preprocessing on numpy examples, and the grain transforms that apply them.

An example is a dict of numpy arrays: "image" uint8 [H, W, 3]; class maps ("semseg",
"human_parts", "sal", "edge") uint8 [H, W] with 255 = ignore; "depth" float32 [H, W] in metres with
0 = invalid; "normals" float32 [H, W, 3] unit vectors with an all-zero vector = invalid. Geometric
operations resample the image bicubically and every label with nearest neighbours (labels are
never interpolated, so no normal is ever mixed with an invalid neighbour), through the same
coordinate mapping, so image and labels stay aligned. Normals turn with the image: a horizontal
flip negates their x component, a rotation rotates their (x, y) components (x right, y down in the
image, as the survey's `ScaleNRotate` assumes). Randomness comes only from the
`np.random.Generator` that grain derives from the pipeline seed and the record index.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from data_pipelines.normalization import IMAGENET_MEAN, IMAGENET_STD

CLASS_TASKS = ("semseg", "human_parts", "sal", "edge")
DENSE_TASKS = CLASS_TASKS + ("depth", "normals")
IGNORE_LABEL = 255
INVALID_DEPTH = 0.0
INVALID_NORMAL = 0.0


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


def label_fill(task: str) -> float:
  """The value that marks an unlabelled pixel of `task` (padding, uncovered borders)."""
  if task == "depth":
    return INVALID_DEPTH
  if task == "normals":
    return INVALID_NORMAL
  return IGNORE_LABEL


def _to_pil(array: np.ndarray, task: str) -> Image.Image:
  if task in ("depth", "normals"):
    return Image.fromarray(np.ascontiguousarray(array, np.float32), mode="F")
  return Image.fromarray(np.ascontiguousarray(array))


def _resample(task: str) -> Image.Resampling:
  return Image.Resampling.BICUBIC if task == "image" else Image.Resampling.NEAREST


def _warp(array: np.ndarray, key: str, apply) -> np.ndarray:
  """`apply(pil_image)` on the entry `key`; normals channel by channel (PIL has no 3-channel float
  mode), each with the same nearest sampling, so the vector of a pixel moves as a whole."""
  if key == "normals":
    return np.stack([np.asarray(apply(_to_pil(array[..., c], key))) for c in range(3)], axis=-1)
  return np.asarray(apply(_to_pil(array, key)))


def hflip(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Mirrors the image and every dense label left-right; normals' x component changes sign."""
  out = dict(example)
  for key in ("image", *DENSE_TASKS):
    if key in out:
      out[key] = np.ascontiguousarray(out[key][:, ::-1])
  if "normals" in out:
    out["normals"] = out["normals"] * np.array([-1, 1, 1], np.float32)
  return out


def rotate_normals(normals: np.ndarray, angle: float) -> np.ndarray:
  """Turns normals [H, W, 3] (x right, y down) with an image rotated by `angle` degrees
  counter-clockwise on screen: x' = x cos a + y sin a, y' = -x sin a + y cos a (the survey's
  ScaleNRotate). Invalid (all-zero) vectors stay zero."""
  cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
  out = normals.astype(np.float32, copy=True)
  x, y = normals[..., 0], normals[..., 1]
  out[..., 0] = x * cos + y * sin
  out[..., 1] = -x * sin + y * cos
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
      out[key] = _warp(out[key], key,
                       lambda im, k=key: im.resize((width, height), _resample(k), box=box))
  if "depth" in out:
    out["depth"] = out["depth"] / np.float32(scale)
  return out


def rotate_scale(example: Mapping[str, np.ndarray], angle: float,
                 scale: float) -> dict[str, np.ndarray]:
  """Rotates by `angle` degrees and scales by `scale` about the centre, keeping the size.

  Positive angles turn the content counter-clockwise on screen (as cv2.getRotationMatrix2D,
  which the survey uses). Uncovered borders are filled with 0 in the image and every label (as the
  survey code's ScaleNRotate does; for normals 0 is invalid), except that a label map that is
  entirely ignore stays entirely ignore. Depth, if present, is divided by `scale`; normals are
  rotated by `angle` (`rotate_normals`).
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
    out[key] = _warp(out[key], key, lambda im, k=key, f=fill: im.transform(
        (width, height), Image.Transform.AFFINE, coefficients, _resample(k), fillcolor=f))
  if "depth" in out:
    out["depth"] = out["depth"] / np.float32(scale)
  if "normals" in out:
    out["normals"] = rotate_normals(out["normals"], angle)
  return out


def resize(example: Mapping[str, np.ndarray], size: Sequence[int],
           keys: Sequence[str] = ("image", *DENSE_TASKS)) -> dict[str, np.ndarray]:
  """Resizes the entries `keys` to (height, width) = `size` (image bicubic, labels nearest)."""
  height, width = size
  out = dict(example)
  for key in keys:
    if key in out and out[key].shape[:2] != (height, width):
      out[key] = _warp(out[key], key,
                       lambda im, k=key: im.resize((width, height), _resample(k)))
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
  """Places `label` [h, w, ...] top-left in a [H, W, ...] canvas filled with `fill`."""
  height, width = label.shape[:2]
  if height > size[0] or width > size[1]:
    raise ValueError(f"a {height}x{width} label does not fit the eval_label_size canvas "
                     f"{size[0]}x{size[1]}; raise config.dataset.eval_label_size")
  canvas = np.full((*size, *label.shape[2:]), fill, label.dtype)
  canvas[:height, :width] = label
  return canvas


def decode_normals(stored: np.ndarray) -> np.ndarray:
  """Stored normals -> float32 [H, W, 3], 0 = invalid.

  Prepared records hold either the float vectors themselves (NYUD-v2) or uint8 [H, W, 4] (PASCAL:
  the distilled PNG's values v in RGB, component = 2 v / 255 - 1, and A = 255 where the normal is
  valid).
  """
  stored = np.asarray(stored)
  if stored.dtype == np.uint8:
    if stored.ndim != 3 or stored.shape[-1] != 4:
      raise ValueError(f"uint8 normals must be [H, W, 4] (RGB + validity), got {stored.shape}")
    normals = 2.0 * stored[..., :3].astype(np.float32) / 255.0 - 1.0
    return np.where(stored[..., 3:] > 0, normals, INVALID_NORMAL).astype(np.float32)
  return np.array(stored, np.float32)


def encode_normals_uint8(normals: np.ndarray) -> np.ndarray:
  """The inverse of `decode_normals` for normals that came from 8-bit values (PASCAL's PNGs)."""
  valid = np.any(normals != 0, axis=-1)
  rgb = np.clip(np.round((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return np.concatenate([rgb, (255 * valid).astype(np.uint8)[..., None]], axis=-1)


def decode(record: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, np.ndarray]:
  """The arrays of a prepared record: labels as [H, W] (normals [H, W, 3] float32)."""
  example = {"image": np.asarray(record["image"], np.uint8)}
  for task in tasks:
    label = np.asarray(record[task])
    if task == "normals":
      example[task] = decode_normals(label)
    else:
      example[task] = label[..., 0] if label.ndim == 3 else label
  return example


def ignore_empty_human_parts(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A human-parts map without any part pixel becomes all ignore (the survey's AddIgnoreRegions,
  applied after its augmentations: parts moved out of the frame leave nothing to learn)."""
  parts = example.get("human_parts")
  if parts is not None and not np.any((parts != 0) & (parts != IGNORE_LABEL)):
    example = dict(example)
    example["human_parts"] = np.full_like(parts, IGNORE_LABEL)
  return example


def finalize(example: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, np.ndarray]:
  """The batch dtypes: image float32 normalised, class maps int32, depth and normals float32."""
  out = {"image": normalize_image(example["image"])}
  for task in tasks:
    floating = task in ("depth", "normals")
    out[task] = example[task].astype(np.float32 if floating else np.int32)
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
    example = ignore_empty_human_parts(resize(example, self.size))
    return finalize(example, self.tasks)


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
      out[task] = pad_to_canvas(out[task], self.label_size, label_fill(task))
    out["original_size"] = np.array(original, np.int32)
    out["example_mask"] = np.array(True)
    image_id = element["image_id"]
    out["image_id"] = np.array(image_id.decode() if isinstance(image_id, bytes) else str(image_id))
    return out
