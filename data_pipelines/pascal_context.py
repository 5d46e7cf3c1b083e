"""Reader for PASCAL-Context in the published PASCAL_MT layout (the multi-task survey code's archive).

Layout under the root folder:
  JPEGImages/<id>.jpg                  RGB, at most 500 pixels a side
  ImageSets/Context/{train,val}.txt    ids, one a line
  semseg/VOC12/<id>.png                21 classes 0..20 (0 = background), 255 ignore; where absent,
  semseg/pascal-context/<id>.png       the same encoding
  human_parts/<id>.mat                 PASCAL-Part annotation (`anno` struct, see decode_human_parts)
  sal_distill/<id>.png                 saliency 0..255 (foreground where value / 255 > 0.5)
Only the files of the requested tasks are read.
"""

import os
from collections.abc import Sequence

import numpy as np
import scipy.io

from data_pipelines import io_utils

NAME = "pascal"
TASKS = ("semseg", "human_parts", "sal")
NUM_SEMSEG_CLASSES = 21
NUM_HUMAN_PARTS = 7
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
  file order (later parts win); other pixels of the image are background 0. An image without any
  person part is all ignore (255).

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
  found = False
  for index, obj in enumerate(objects.reshape(-1) if objects.size else []):
    fields = _struct_fields(obj, path, f"object {index}")
    if len(fields) < 4:
      raise io_utils.DataError(f"human_parts file {path}: object {index} has {len(fields)} fields; "
                               "expected (class, class_ind, mask, parts)")
    class_id = int(np.asarray(fields[1]).reshape(-1)[0])
    parts = np.asarray(fields[3])
    if class_id != PERSON_CLASS or parts.size == 0:
      continue
    for part_index, part in enumerate(parts.reshape(-1)):
      part_fields = _struct_fields(part, path, f"part {part_index} of object {index}")
      name = str(np.asarray(part_fields[0]).reshape(-1)[0])
      if name not in PART_CLASSES:
        raise io_utils.DataError(f"human_parts file {path}: unknown person part name {name!r} "
                                 f"(object {index}); expected one of {sorted(PART_CLASSES)}")
      mask = np.asarray(part_fields[1])
      if mask.shape != tuple(shape):
        raise io_utils.DataError(f"human_parts file {path}: mask of part {name!r} (object {index}) "
                                 f"is {mask.shape}, the image is {tuple(shape)}")
      target[mask.astype(bool)] = PART_CLASSES[name]
      found = True
  if not found:
    target[:] = IGNORE_LABEL
  return target


def read_example(root: str, image_id: str, tasks: Sequence[str]) -> dict:
  """Reads and validates one image.

  Args:
    root: the PASCAL_MT folder.
    image_id: the id as listed in the split file.
    tasks: subset of ("semseg", "human_parts", "sal").

  Returns:
    {"image": uint8 [H, W, 3], "image_bytes": encoded image, "image_id": str, "semseg": uint8
     [H, W] (0..20, 255), "human_parts": uint8 [H, W] (0..6, or all 255), "sal": uint8 [H, W]
     (0/1)} (labels of `tasks` only).
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
  return example
