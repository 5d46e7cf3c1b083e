"""File reading shared by the dataset readers: every failure names the file and the problem."""

import io
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image


class DataError(ValueError):
  """A dataset file exists but its content is not what the published layout has."""


class SplitSizeWarning(UserWarning):
  """A split lists a different number of examples than the published dataset."""


def require_dir(path: str, what: str, how_to_get: str) -> None:
  """Raises FileNotFoundError (saying how to obtain the data) unless `path` is a folder."""
  if not path:
    raise FileNotFoundError(
        f"no {what} folder configured (config.dataset.data_dir is empty). {how_to_get}")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} folder {path} not found. {how_to_get}")


def require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} not found")


def read_split_file(path: str, published_size: int | None, how_to_get: str) -> list[str]:
  """Reads a split file (one id a line) and warns when its size differs from the published one.

  Args:
    path: the split file, e.g. `<root>/gt_sets/train.txt`.
    published_size: the number of ids the published split has (None: no check).
    how_to_get: appended to the error when the file is missing.

  Returns:
    The ids in file order.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"split file {path} not found. {how_to_get}")
  # utf-8-sig: an editor's byte order mark would otherwise become part of the first id.
  try:
    with open(path, encoding="utf-8-sig") as f:
      ids = [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise DataError(f"split file {path} is not UTF-8 text ({e}); expected one id a line in "
                    "UTF-8 (a PowerShell '>' redirect writes UTF-16: save it as UTF-8)") from e
  if not ids:
    raise DataError(f"split file {path} lists no image ids")
  duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
  if duplicates:
    raise DataError(f"split file {path} lists ids more than once: {duplicates[:5]}")
  if published_size is not None and len(ids) != published_size:
    warnings.warn(
        f"split file {path} lists {len(ids)} images; the published split has {published_size}",
        SplitSizeWarning, stacklevel=2)
  return ids


# PIL modes of more than 8 bits a sample (16-bit PNGs open as "I;16", TIFFs as "I" or "F"):
# convert() clips their values to 0..255 instead of scaling them.
_HIGH_DEPTH_MODES = ("I", "F")


def _is_high_depth(mode: str) -> bool:
  return mode in _HIGH_DEPTH_MODES or mode.startswith(("I;", "F;"))


def read_rgb_image(path: str) -> tuple[np.ndarray, bytes]:
  """Decodes an image file to RGB (8-bit modes only: L, P, RGB, RGBA, CMYK, YCbCr, ...).

  Returns:
    The pixels, uint8 [H, W, 3], and encoded bytes that decode to exactly these pixels: the file's
    own bytes for an RGB JPEG, otherwise a PNG of the RGB conversion.
  """
  require_file(path, "image")
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      mode, fmt = image.mode, image.format
      if _is_high_depth(mode):
        raise DataError(f"image {path} has PIL mode {mode!r} (more than 8 bits a sample, which "
                        "a conversion to RGB would clip); expected an 8-bit image such as an "
                        "RGB JPEG")
      rgb = image.convert("RGB") if mode != "RGB" else image.copy()
  except DataError:
    raise
  except Exception as e:  # PIL raises several types for broken files.
    raise DataError(f"cannot decode image {path}: {e}") from e
  pixels = np.asarray(rgb, dtype=np.uint8)
  if mode == "RGB" and fmt == "JPEG":
    return pixels, data
  buffer = io.BytesIO()
  rgb.save(buffer, format="PNG")
  return pixels, buffer.getvalue()


# The PNG modes of at most 8 bits a sample, which convert() maps to luminance without clipping.
_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def _read_png(path: str, what: str, modes: tuple[str, ...], expected: str,
              convert: str | None = None) -> np.ndarray:
  """A label image as its stored uint8 values, in one of the PIL `modes` (after `convert`)."""
  require_file(path, f"{what} label")
  try:
    with Image.open(path) as image:
      image.load()
      if image.format != "PNG":
        # A JPEG's compression blends neighbouring label values into other valid ones (class 6
        # between classes 5 and 7), so the range check alone would not catch it.
        raise DataError(f"{what} label {path} is a {image.format} file; expected a PNG as "
                        "published (a lossy format changes label values)")
      if convert is not None and image.mode != convert:
        if image.mode not in _CONVERTIBLE_MODES:
          raise DataError(f"{what} label {path} has PIL mode {image.mode!r}; expected an 8-bit "
                          f"PNG (one of the modes {', '.join(_CONVERTIBLE_MODES)}), not 16-bit "
                          "or float values, which a conversion would clip")
        image = image.convert(convert)
      if image.mode not in modes:
        raise DataError(f"{what} label {path} has PIL mode {image.mode!r}; expected {expected}")
      return np.array(image, dtype=np.uint8)
  except DataError:
    raise
  except Exception as e:
    raise DataError(f"cannot decode {what} label {path}: {e}") from e


def read_label_png(path: str, what: str, grayscale: bool = False) -> np.ndarray:
  """Reads a label image as its stored values, uint8 [H, W].

  Args:
    path: the PNG file.
    what: the task, for error messages.
    grayscale: convert to luminance first (saliency maps that may be stored as RGB or palette
      PNGs); 16-bit and float maps are rejected rather than clipped.
  """
  return _read_png(path, what, ("L", "P"), "a single-channel 8-bit PNG ('L' or palette 'P')",
                   convert="L" if grayscale else None)


def read_rgb_png(path: str, what: str) -> np.ndarray:
  """Reads a 3-channel label image (e.g. encoded surface normals) as stored, uint8 [H, W, 3]."""
  return _read_png(path, what, ("RGB",), "an 8-bit RGB image")


def check_shape(label: np.ndarray, shape: Sequence[int], path: str, what: str) -> None:
  if tuple(label.shape[:2]) != tuple(shape):
    raise DataError(f"{what} label {path} is {label.shape[0]}x{label.shape[1]} but its image is "
                    f"{shape[0]}x{shape[1]}")


def check_values(label: np.ndarray, allowed: Iterable[int], path: str, what: str) -> None:
  """Raises DataError naming the file if `label` holds a value outside `allowed`."""
  allowed = np.asarray(sorted(set(allowed)))
  present = np.unique(label)
  bad = present[~np.isin(present, allowed)]
  if bad.size:
    raise DataError(f"{what} label {path} holds unexpected values {bad[:10].tolist()}; expected "
                    f"{_describe(allowed)}")


def _describe(values: np.ndarray) -> str:
  values = values.tolist()
  runs, start = [], values[0]
  for prev, cur in zip(values, values[1:] + [None]):
    if cur is None or cur != prev + 1:
      runs.append(f"{start}" if start == prev else f"{start}..{prev}")
      start = cur
  return ", ".join(runs)
