"""Reader for PASCAL-Context in the published PASCAL_MT layout (the multi-task survey code's archive).

Layout under the root folder:
  JPEGImages/<id>.jpg                  RGB, at most 500 pixels a side
  ImageSets/Context/{train,val}.txt    ids, one a line
  semseg/VOC12/<id>.png                21 classes 0..20 (0 = background), 255 ignore; where absent,
  semseg/pascal-context/<id>.png       the same encoding
  human_parts/<id>.mat                 PASCAL-Part annotation (`anno` struct, see decode_human_parts)
  sal_distill/<id>.png                 saliency 0..255 (foreground where value / 255 > 0.5)
  normals_distill/<id>.png             RGB surface normals, component = 2 * value / 255 - 1
  pascal-context/trainval/<id>.mat     the PASCAL-Context label map (`LabelMap`, 459 classes)
Only the files of the requested tasks are read.

Normals and edges follow the survey code (data/pascal_context.py): normals are kept only on
pixels whose PASCAL-Context class also exists in NYUD-v2 (where the distilled normals mean
something), elsewhere they are 0 (invalid); edges are the thinned nonzero response of a 3x3
Laplacian of the label map. The edge evaluation compares against the label map's boundaries as
SEISM draws them (`boundary_ground_truth`).
"""

import os
from collections.abc import Sequence

import numpy as np
import scipy.io
from skimage import morphology

from data_pipelines import io_utils

NAME = "pascal"
TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
NUM_SEMSEG_CLASSES = 21
NUM_HUMAN_PARTS = 7
# Class ids of the PASCAL-Context `LabelMap`: 1..459 (labels.txt), 0 where no class is drawn.
NUM_CONTEXT_CLASSES = 459
IGNORE_LABEL = 255
PERSON_CLASS = 15
SPLIT_FILE = "ImageSets/Context/{split}.txt"
PUBLISHED_SPLIT_SIZES = {"train": 4998, "val": 5105}
HOW_TO_GET = (
    "Download and extract the published PASCAL_MT.tgz of the multi-task survey code (ETH vision "
    "data share, kmaninis/share/MTL/) and point config.dataset.data_dir at the "
    "extracted PASCAL_MT folder, or write synthetic data in the same layout with "
    "`python -m data_pipelines.synthetic --dataset pascal --out DIR`.")

# PASCAL-Part person part names -> the 6 part classes of the survey code (0 is background).
PART_CLASSES = {
    **{name: 1 for name in ("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye",
                            "mouth", "nose")},
    "torso": 2, "neck": 2,
    "luarm": 3, "ruarm": 3,
    "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5,
    "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}


# PASCAL-Context classes (ids of the 459-class `LabelMap`) on which the distilled normals are
# kept: the names shared with NYUD-v2's classes except "unknown", plus "tvmonitor" (the survey's
# data/db_info/{nyu,context}_classes.json and its "custom additions due to incompatibilities").
NORMALS_VALID_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50,
    51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104,
    105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172,
    174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230,
    232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281,
    283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323,
    329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383,
    384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432,
    440, 441, 442, 443, 444, 446, 454, 457))
CONTEXT_LABELS = "pascal-context/trainval/{image_id}.mat"


def check_root(root: str) -> None:
  io_utils.require_dir(root, "PASCAL_MT", HOW_TO_GET)


def split_ids(root: str, split: str) -> list[str]:
  """The image ids of a split, from `ImageSets/Context/<split>.txt`."""
  check_root(root)
  return io_utils.read_split_file(os.path.join(root, SPLIT_FILE.format(split=split)),
                                  PUBLISHED_SPLIT_SIZES.get(split), HOW_TO_GET)


def semseg_path(root: str, image_id: str) -> str:
  """`semseg/VOC12/<id>.png` where it exists, else `semseg/pascal-context/<id>.png`."""
  voc = os.path.join(root, "semseg", "VOC12", f"{image_id}.png")
  if os.path.isfile(voc):
    return voc
  context = os.path.join(root, "semseg", "pascal-context", f"{image_id}.png")
  if not os.path.isfile(context):
    raise FileNotFoundError(f"semseg label for {image_id} not found: neither {voc} nor {context}")
  return context


def _struct_fields(value, path: str, what: str):
  """The field tuple of a loaded MATLAB struct element."""
  try:
    return tuple(value)
  except TypeError as e:
    raise io_utils.DataError(f"human_parts file {path}: {what} is not a MATLAB struct") from e


def decode_human_parts(path: str, shape: Sequence[int]) -> np.ndarray:
  """Decodes a PASCAL-Part `.mat` file into the 7-class part map of the survey code.

  `anno[0][0][1][0]` is the object list; an object's field 1 is its class id (person = 15), field 2
  its instance mask and field 3 its parts, each (part name, mask). Person parts are painted in
  file order (later parts win); other pixels of the image are background 0.

  The whole map is ignore (255), as in the survey's loader (`has_human_parts`, then
  `AddIgnoreRegions`, which turns an all-background part map into 255), when the image has no
  person with a non-empty instance mask, or when no part pixel gets painted (no person has parts,
  or all their part masks are empty). The survey's evaluator skips such images; here their pixels
  are ignored, which is the same.

  Args:
    path: the `.mat` file.
    shape: (height, width) of the image, which every mask must match.

  Returns:
    uint8 [H, W] with values 0..6, or all 255.
  """
  io_utils.require_file(path, "human_parts label")
  try:
    anno = scipy.io.loadmat(path)["anno"]
  except Exception as e:  # scipy raises ValueError / TypeError / KeyError for broken files.
    raise io_utils.DataError(f"cannot read human_parts file {path}: {e!r}") from e
  try:
    objects = anno[0][0][1]
  except (IndexError, TypeError, ValueError) as e:
    raise io_utils.DataError(f"human_parts file {path} has no `anno[0][0][1]` object list") from e
  target = np.zeros(tuple(shape), np.uint8)
  has_person = False
  for index, obj in enumerate(objects.reshape(-1) if objects.size else []):
    fields = _struct_fields(obj, path, f"object {index}")
    if len(fields) < 4:
      raise io_utils.DataError(f"human_parts file {path}: object {index} has {len(fields)} fields; "
                               "expected (class, class_ind, mask, parts)")
    class_ind = np.asarray(fields[1]).reshape(-1)
    if class_ind.size != 1 or not np.issubdtype(class_ind.dtype, np.number):
      raise io_utils.DataError(f"human_parts file {path}: object {index} has class_ind "
                               f"{class_ind.dtype} of size {class_ind.size}; expected one class id")
    class_id = int(class_ind[0])
    if class_id != PERSON_CLASS:
      continue
    # The survey lists an image as having human parts if a person's instance mask has area > 0.
    has_person |= bool(np.asarray(fields[2]).any())
    parts = np.asarray(fields[3])
    for part_index, part in enumerate(parts.reshape(-1) if parts.size else []):
      part_fields = _struct_fields(part, path, f"part {part_index} of object {index}")
      if len(part_fields) < 2:
        raise io_utils.DataError(f"human_parts file {path}: part {part_index} of object {index} "
                                 f"has {len(part_fields)} field(s); expected (part_name, mask)")
      stored_name = np.asarray(part_fields[0]).reshape(-1)
      if stored_name.size != 1 or not str(stored_name[0]):
        raise io_utils.DataError(
            f"human_parts file {path}: part {part_index} of object {index} has an empty or "
            f"malformed part_name ({stored_name.size} value(s) of {stored_name.dtype}); expected "
            f"one of {sorted(PART_CLASSES)}")
      name = str(stored_name[0])
      if name not in PART_CLASSES:
        raise io_utils.DataError(f"human_parts file {path}: unknown person part name {name!r} "
                                 f"(object {index}); expected one of {sorted(PART_CLASSES)}")
      mask = np.asarray(part_fields[1])
      if mask.shape != tuple(shape):
        raise io_utils.DataError(f"human_parts file {path}: mask of part {name!r} (object {index}) "
                                 f"is {mask.shape}, the image is {tuple(shape)}")
      target[mask.astype(bool)] = PART_CLASSES[name]
  if not has_person or not target.any():
    target[:] = IGNORE_LABEL
  return target


def read_context_labels(root: str, image_id: str, shape: Sequence[int]) -> np.ndarray:
  """The PASCAL-Context label map (`LabelMap`) of an image, int32 [H, W]."""
  path = os.path.join(root, CONTEXT_LABELS.format(image_id=image_id))
  io_utils.require_file(path, "PASCAL-Context label map")
  try:
    labels = np.asarray(scipy.io.loadmat(path)["LabelMap"])
  except Exception as e:  # scipy raises ValueError / TypeError / KeyError for broken files.
    raise io_utils.DataError(f"cannot read the PASCAL-Context label map {path} (a `LabelMap` "
                             f"array): {e!r}") from e
  integral = np.issubdtype(labels.dtype, np.integer) or (
      np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))
  if labels.ndim != 2 or not integral:
    raise io_utils.DataError(f"PASCAL-Context label map {path} is {labels.dtype} of shape "
                             f"{labels.shape}; expected a 2-D array of class ids")
  io_utils.check_shape(labels, shape, path, "PASCAL-Context")
  if labels.min() < 0 or labels.max() > NUM_CONTEXT_CLASSES:
    bad = np.unique(labels[(labels < 0) | (labels > NUM_CONTEXT_CLASSES)])
    raise io_utils.DataError(f"PASCAL-Context label map {path} holds class ids "
                             f"{bad[:10].astype(np.int64).tolist()} outside "
                             f"0..{NUM_CONTEXT_CLASSES}; expected the {NUM_CONTEXT_CLASSES}-class "
                             "ids (0 = no class)")
  return labels.astype(np.int32)


def decode_normals(path: str, context_labels: np.ndarray) -> np.ndarray:
  """Distilled normals, float32 [H, W, 3]: 2 * value / 255 - 1 on pixels of a class in
  NORMALS_VALID_CLASSES, 0 (invalid) elsewhere."""
  raw = io_utils.read_rgb_png(path, "normals")
  io_utils.check_shape(raw, context_labels.shape, path, "normals")
  normals = 2.0 * raw.astype(np.float32) / 255.0 - 1.0
  valid = np.isin(context_labels, sorted(NORMALS_VALID_CLASSES))
  return np.where(valid[..., None], normals, 0.0).astype(np.float32)


def _laplacian(labels: np.ndarray) -> np.ndarray:
  """cv2.Laplacian(labels) with its defaults (3x3 kernel 0 1 0 / 1 -4 1 / 0 1 0, borders
  reflected without repeating the edge pixel), in exact integer arithmetic."""
  p = np.pad(labels.astype(np.int64), 1, mode="reflect")
  return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]


def edges_from_labels(context_labels: np.ndarray) -> np.ndarray:
  """The survey's PASCAL edge label, uint8 [H, W] {0, 1}: skimage's thinning of the pixels where
  the label map's Laplacian is nonzero."""
  return morphology.thin(_laplacian(context_labels) != 0).astype(np.uint8)


def boundary_ground_truth(context_labels: np.ndarray) -> np.ndarray:
  """The boundary map SEISM scores edges against, uint8 [H, W] {0, 1} (BSDS `seg2bmap`): a pixel
  whose label differs from its right, lower or lower-right neighbour; in the last row only the
  right neighbour counts, in the last column only the lower one, never the corner pixel."""
  seg = np.asarray(context_labels)
  right = np.zeros(seg.shape, bool)
  below = np.zeros(seg.shape, bool)
  diagonal = np.zeros(seg.shape, bool)
  right[:, :-1] = seg[:, :-1] != seg[:, 1:]
  below[:-1, :] = seg[:-1, :] != seg[1:, :]
  diagonal[:-1, :-1] = seg[:-1, :-1] != seg[1:, 1:]
  bmap = right | below | diagonal
  bmap[-1, :] = right[-1, :]
  bmap[:, -1] = below[:, -1]
  bmap[-1, -1] = False
  return bmap.astype(np.uint8)


def read_example(root: str, image_id: str, tasks: Sequence[str]) -> dict:
  """Reads and validates one image.

  Args:
    root: the PASCAL_MT folder.
    image_id: the id as listed in the split file.
    tasks: subset of ("semseg", "human_parts", "sal", "normals", "edge").

  Returns:
    {"image": uint8 [H, W, 3], "image_bytes": encoded image, "image_id": str, "semseg": uint8
     [H, W] (0..20, 255), "human_parts": uint8 [H, W] (0..6, or all 255), "sal": uint8 [H, W]
     (0/1), "normals": float32 [H, W, 3] (0 = invalid), "edge": uint8 [H, W] (0/1, the training
     label), "edge_gt": uint8 [H, W] (0/1, the boundaries the evaluation scores against)}
    (labels of `tasks` only; "edge_gt" with "edge").
  """
  unknown = set(tasks) - set(TASKS)
  if unknown:
    raise ValueError(f"PASCAL-Context has no task(s) {sorted(unknown)}; available: {TASKS}")
  image, image_bytes = io_utils.read_rgb_image(
      os.path.join(root, "JPEGImages", f"{image_id}.jpg"))
  example = {"image": image, "image_bytes": image_bytes, "image_id": image_id}
  shape = image.shape[:2]
  if "semseg" in tasks:
    path = semseg_path(root, image_id)
    semseg = io_utils.read_label_png(path, "semseg")
    io_utils.check_shape(semseg, shape, path, "semseg")
    io_utils.check_values(semseg, [*range(NUM_SEMSEG_CLASSES), IGNORE_LABEL], path, "semseg")
    example["semseg"] = semseg
  if "human_parts" in tasks:
    example["human_parts"] = decode_human_parts(
        os.path.join(root, "human_parts", f"{image_id}.mat"), shape)
  if "sal" in tasks:
    path = os.path.join(root, "sal_distill", f"{image_id}.png")
    sal = io_utils.read_label_png(path, "sal", grayscale=True)
    io_utils.check_shape(sal, shape, path, "sal")
    # The survey code's threshold: value / 255 > 0.5.
    example["sal"] = (sal.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)
  if "normals" in tasks or "edge" in tasks:
    context_labels = read_context_labels(root, image_id, shape)
    if "normals" in tasks:
      example["normals"] = decode_normals(
          os.path.join(root, "normals_distill", f"{image_id}.png"), context_labels)
    if "edge" in tasks:
      example["edge"] = edges_from_labels(context_labels)
      example["edge_gt"] = boundary_ground_truth(context_labels)
  return example
