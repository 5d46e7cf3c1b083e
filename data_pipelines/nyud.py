"""Reader for NYUD-v2 in the published NYUD_MT layout (the multi-task survey code's archive).

Layout under the root folder:
  images/<id>.jpg          RGB, 480x640
  segmentation/<id>.png    uint8, 0 = void, 1..40 = the 40 NYU classes
  depth/<id>.npy           float metres, 0 = no reading
  normals/<id>.npy         float [H, W, 3] surface normals, components in [-1, 1]; an all-zero
                           vector marks a pixel without a normal
  edge/<id>.npy            [H, W] boundary map, 1 = edge, 0 = none
  gt_sets/{train,val}.txt  ids, one a line
Only the files of the requested tasks are read. The survey code (data/nyud.py) loads normals and
edges as stored, `np.load(...)`, and thresholds edges at 0.5 in its loss; so does this reader
(edges become uint8 {0, 1}).
"""

import os
from collections.abc import Sequence

import numpy as np

from data_pipelines import io_utils

NAME = "nyud"
TASKS = ("semseg", "depth", "normals", "edge")
NUM_SEMSEG_CLASSES = 40
IGNORE_LABEL = 255
SPLIT_FILE = "gt_sets/{split}.txt"
PUBLISHED_SPLIT_SIZES = {"train": 795, "val": 654}
# 0-based ids (after the void shift) of the classes the synthetic scenes use.
NYU_CLASS_IDS = {
    "wall": 0, "floor": 1, "cabinet": 2, "bed": 3, "chair": 4, "sofa": 5, "table": 6, "door": 7,
    "window": 8, "bookshelf": 9, "picture": 10, "ceiling": 21,
}
HOW_TO_GET = (
    "Download and extract the published NYUD_MT archive of the multi-task survey code (Google Drive "
    "id 14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw) and point config.dataset.data_dir at "
    "the extracted NYUD_MT folder, or write synthetic data in the same layout with "
    "`python -m data_pipelines.synthetic --dataset nyud --out DIR`.")


def check_root(root: str) -> None:
  io_utils.require_dir(root, "NYUD_MT", HOW_TO_GET)


def split_ids(root: str, split: str) -> list[str]:
  """The image ids of a split, from `gt_sets/<split>.txt`."""
  check_root(root)
  return io_utils.read_split_file(os.path.join(root, SPLIT_FILE.format(split=split)),
                                  PUBLISHED_SPLIT_SIZES.get(split), HOW_TO_GET)


def decode_semseg(raw: np.ndarray, path: str) -> np.ndarray:
  """Maps the stored 0..40 (0 = void) to 0..39 with 255 = ignore, uint8 [H, W]."""
  io_utils.check_values(raw, range(NUM_SEMSEG_CLASSES + 1), path, "semseg")
  return np.where(raw == 0, IGNORE_LABEL, raw.astype(np.int32) - 1).astype(np.uint8)


def _load_npy(path: str, what: str) -> np.ndarray:
  io_utils.require_file(path, f"{what} label")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:
    raise io_utils.DataError(f"cannot load {what} label {path}: {e}") from e


def read_depth(path: str, shape: Sequence[int]) -> np.ndarray:
  """Loads a depth map in metres, float32 [H, W]; 0 marks pixels without a reading."""
  depth = _load_npy(path, "depth")
  if depth.ndim == 3 and depth.shape[-1] == 1:
    depth = depth[..., 0]
  if depth.ndim != 2:
    raise io_utils.DataError(f"depth label {path} is {depth.dtype} of shape {depth.shape}; "
                             "expected a 2-D float array")
  # Integer maps are usually millimetres (NYU's raw 16-bit depth), which would pass as metres.
  if not np.issubdtype(depth.dtype, np.floating):
    raise io_utils.DataError(f"depth label {path} is {depth.dtype}; expected float metres "
                             "(float16/32/64). Integer millimetres must be divided by 1000 and "
                             "saved as float")
  io_utils.check_shape(depth, shape, path, "depth")
  depth = depth.astype(np.float32)
  if not np.all(np.isfinite(depth)) or depth.min() < 0:
    raise io_utils.DataError(f"depth label {path} holds negative or non-finite values; expected "
                             "metres >= 0 (0 = no reading)")
  return depth


# Stored components may stray past +-1 by rounding (a renormalised or re-encoded map).
_NORMALS_TOLERANCE = 1e-3


def read_normals(path: str, shape: Sequence[int]) -> np.ndarray:
  """Loads surface normals, float32 [H, W, 3]; all-zero vectors mark pixels without a normal."""
  normals = _load_npy(path, "normals")
  if (normals.ndim != 3 or normals.shape[-1] != 3
      or not np.issubdtype(normals.dtype, np.floating)):
    raise io_utils.DataError(f"normals label {path} is {normals.dtype} of shape {normals.shape}; "
                             "expected a float [H, W, 3] array of normal components in [-1, 1]")
  io_utils.check_shape(normals, shape, path, "normals")
  normals = normals.astype(np.float32)
  if not np.all(np.isfinite(normals)) or np.abs(normals).max() > 1 + _NORMALS_TOLERANCE:
    raise io_utils.DataError(f"normals label {path} holds non-finite values or components outside "
                             "[-1, 1]; expected unit normals (0 = no normal)")
  return normals


def read_edge(path: str, shape: Sequence[int]) -> np.ndarray:
  """Loads a boundary map as uint8 [H, W] in {0, 1} (stored values >= 0.5 are edges)."""
  edge = _load_npy(path, "edge")
  if edge.ndim == 3 and edge.shape[-1] == 1:
    edge = edge[..., 0]
  if edge.ndim != 2 or not (np.issubdtype(edge.dtype, np.integer)
                            or np.issubdtype(edge.dtype, np.floating) or edge.dtype == bool):
    raise io_utils.DataError(f"edge label {path} is {edge.dtype} of shape {edge.shape}; expected "
                             "a 2-D array of 0 (no edge) and 1 (edge)")
  io_utils.check_shape(edge, shape, path, "edge")
  edge = edge.astype(np.float32)
  if not np.all(np.isfinite(edge)) or edge.min() < 0 or edge.max() > 1:
    raise io_utils.DataError(f"edge label {path} holds values outside [0, 1] (range "
                             f"{edge.min()}..{edge.max()}); expected 0 (no edge) and 1 (edge)")
  return (edge >= 0.5).astype(np.uint8)


def read_example(root: str, image_id: str, tasks: Sequence[str]) -> dict:
  """Reads and validates one frame.

  Args:
    root: the NYUD_MT folder.
    image_id: the id as listed in the split file.
    tasks: subset of ("semseg", "depth", "normals", "edge").

  Returns:
    {"image": uint8 [H, W, 3], "image_bytes": encoded image, "image_id": str,
     "semseg": uint8 [H, W] (0..39, 255 ignore), "depth": float32 [H, W], "normals": float32
     [H, W, 3] (0 = invalid), "edge": uint8 [H, W] (0/1)} (labels of `tasks` only).
  """
  unknown = set(tasks) - set(TASKS)
  if unknown:
    raise ValueError(f"NYUD-v2 has no task(s) {sorted(unknown)}; available: {TASKS}")
  image, image_bytes = io_utils.read_rgb_image(os.path.join(root, "images", f"{image_id}.jpg"))
  example = {"image": image, "image_bytes": image_bytes, "image_id": image_id}
  shape = image.shape[:2]
  if "semseg" in tasks:
    path = os.path.join(root, "segmentation", f"{image_id}.png")
    raw = io_utils.read_label_png(path, "semseg")
    io_utils.check_shape(raw, shape, path, "semseg")
    example["semseg"] = decode_semseg(raw, path)
  if "depth" in tasks:
    example["depth"] = read_depth(os.path.join(root, "depth", f"{image_id}.npy"), shape)
  if "normals" in tasks:
    example["normals"] = read_normals(os.path.join(root, "normals", f"{image_id}.npy"), shape)
  if "edge" in tasks:
    example["edge"] = read_edge(os.path.join(root, "edge", f"{image_id}.npy"), shape)
  return example
