"""tensorflow-datasets builders `nyud_v2_mt` and `pascal_context_mt`, prepared from a manual dir.

The extracted NYUD_MT / PASCAL_MT folder is the manual dir; the builders validate every file (see
`nyud.read_example`, `pascal_context.read_example`) and write array_record files that
`tfds.data_source` reads with random access and without TensorFlow. The builder config is named
after the requested tasks, so only those tasks' files are needed and stored.

Features of every example:
  image        uint8 [H, W, 3] (the original encoded image)
  image_id     text
  original_size int32 [2] (height, width)
  semseg, human_parts, sal, edge   uint8 [H, W, 1] (PNG), for the requested tasks
  depth        float32 [H, W] (zlib), metres, 0 = invalid
  normals      NYUD-v2: float32 [H, W, 3] (zlib), the stored vectors; PASCAL: uint8 [H, W, 4]
               (PNG), the distilled PNG's values and a validity channel
               (`transforms.decode_normals` turns both into float vectors, 0 = invalid)
  edge_gt      PASCAL with edge: uint8 [H, W, 1] (PNG), the boundaries the edge evaluation
               scores against (`BOUNDARY_GT_FEATURE`)
"""

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import warnings
from collections.abc import Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import io_utils
from data_pipelines import nyud
from data_pipelines import pascal_context
from data_pipelines import transforms

READERS = {"nyud": nyud, "pascal": pascal_context}
FILE_FORMAT = "array_record"
# The record feature holding the ground truth of the boundary evaluation: NYUD-v2's edge files
# themselves; for PASCAL the label-map boundaries SEISM uses (the training label is thinned).
BOUNDARY_GT_FEATURE = {"nyud": "edge", "pascal": "edge_gt"}


@dataclasses.dataclass(eq=False)
class TasksConfig(tfds.core.BuilderConfig):
  """A builder config holding the tasks whose labels are read and stored."""
  tasks: tuple[str, ...] = ()


def config_name(tasks: Sequence[str]) -> str:
  """The builder config name of a task set ("semseg+depth")."""
  return "+".join(tasks)


def _all_task_configs(all_tasks: Sequence[str]) -> list[TasksConfig]:
  """One config per non-empty subset of the tasks (kept in the dataset's task order)."""
  configs = []
  for mask in range(1, 2 ** len(all_tasks)):
    tasks = tuple(t for i, t in enumerate(all_tasks) if mask >> i & 1)
    configs.append(TasksConfig(name=config_name(tasks), tasks=tasks,
                               description=f"labels of the tasks {', '.join(tasks)}"))
  return sorted(configs, key=lambda c: -len(c.tasks))


def _label_image(channels: int = 1) -> tfds.features.Image:
  return tfds.features.Image(shape=(None, None, channels), dtype=np.uint8, encoding_format="png")


def _task_features(dataset: str, tasks: Sequence[str]) -> dict[str, tfds.features.FeatureConnector]:
  """The label features of `tasks` (plus "edge_gt" where the dataset has a separate one)."""
  features = {}
  for task in tasks:
    if task == "depth":
      features[task] = tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib")
    elif task == "normals" and dataset == "nyud":
      features[task] = tfds.features.Tensor(shape=(None, None, 3), dtype=np.float32,
                                            encoding="zlib")
    elif task == "normals":
      features[task] = _label_image(channels=4)
    else:
      features[task] = _label_image()
  if "edge" in tasks and BOUNDARY_GT_FEATURE[dataset] != "edge":
    features[BOUNDARY_GT_FEATURE[dataset]] = _label_image()
  return features


def _encode_label(dataset: str, key: str, label: np.ndarray):
  """A label as its feature stores it (PIL images, so that no TensorFlow is needed to build)."""
  if key == "depth" or key == "normals" and dataset == "nyud":
    return label
  if key == "normals":
    return Image.fromarray(transforms.encode_normals_uint8(label), mode="RGBA")
  return Image.fromarray(label, mode="L")


class _MultiTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: features from the config's tasks, examples from the dataset's reader."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Normals and edge tasks; human parts of an image whose person part masks are all "
               "empty (or whose persons have empty instance masks) are ignore (255).",
  }
  DATASET = ""  # key into READERS

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes the `importlib_resources` backport, which this project does not need.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                     encoding_format="jpeg"),
        "image_id": tfds.features.Text(),
        "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
    }
    features.update(_task_features(self.DATASET, self.builder_config.tasks))
    # disable_shuffling keeps the split file's order (tfds would order examples by a key hash).
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    reader = READERS[self.DATASET]
    reader.check_root(root)
    return {split: self._generate_examples(root, split) for split in SPLITS}

  def _generate_examples(self, root: str, split: str):
    reader = READERS[self.DATASET]
    tasks = self.builder_config.tasks
    for image_id in reader.split_ids(root, split):
      example = reader.read_example(root, image_id, tasks)
      height, width = example["image"].shape[:2]
      record = {
          "image": example["image_bytes"],
          "image_id": image_id,
          "original_size": np.array([height, width], np.int32),
      }
      keys = list(tasks)
      if "edge" in tasks and BOUNDARY_GT_FEATURE[self.DATASET] != "edge":
        keys.append(BOUNDARY_GT_FEATURE[self.DATASET])
      for key in keys:
        record[key] = _encode_label(self.DATASET, key, example[key])
      yield image_id, record


class NyudV2Mt(_MultiTaskBuilder):
  """NYUD-v2 (795 train / 654 val) from the NYUD_MT folder: semseg (40 classes), depth, normals,
  edges."""

  DATASET = "nyud"
  BUILDER_CONFIGS = _all_task_configs(nyud.TASKS)
  MANUAL_DOWNLOAD_INSTRUCTIONS = nyud.HOW_TO_GET


class PascalContextMt(_MultiTaskBuilder):
  """PASCAL-Context (4998 train / 5105 val) from the PASCAL_MT folder: semseg, parts, saliency,
  normals, edges."""

  DATASET = "pascal"
  BUILDER_CONFIGS = _all_task_configs(pascal_context.TASKS)
  MANUAL_DOWNLOAD_INSTRUCTIONS = pascal_context.HOW_TO_GET


BUILDERS = {"nyud": NyudV2Mt, "pascal": PascalContextMt}


def get_builder(dataset: str, tasks: Sequence[str], prepared_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of `dataset` for `tasks`, reading/writing under `prepared_dir`."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(BUILDERS)}")
  reader = READERS[dataset]
  unknown = set(tasks) - set(reader.TASKS)
  if unknown:
    raise ValueError(f"dataset {dataset!r} has no task(s) {sorted(unknown)}; "
                     f"available: {reader.TASKS}")
  if not tasks:
    raise ValueError("at least one task is needed")
  # Canonical task order, so that ("depth", "semseg") and ("semseg", "depth") share one copy.
  tasks = tuple(t for t in reader.TASKS if t in tasks)
  return BUILDERS[dataset](data_dir=prepared_dir, config=config_name(tasks),
                           file_format=FILE_FORMAT)


SPLITS = ("train", "val")
FINGERPRINT_FILE = "source_fingerprint.json"


def source_fingerprint(dataset: str, data_dir: str) -> dict | None:
  """What identifies an extracted folder's content cheaply: its path and its split files' bytes
  and modification times (rewriting a folder rewrites them). None when the folder is absent."""
  if not data_dir or not os.path.isdir(data_dir):
    return None
  splits = {}
  for split in SPLITS:
    path = os.path.join(data_dir, READERS[dataset].SPLIT_FILE.format(split=split))
    if os.path.isfile(path):
      with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
      splits[split] = {"sha1": digest, "mtime_ns": os.stat(path).st_mtime_ns}
  return {"data_dir": os.path.realpath(data_dir), "split_files": splits}


def _check_source(dataset: str, data_dir: str) -> None:
  """Raises (as preparing would) unless `data_dir` is a folder with readable split files."""
  reader = READERS[dataset]
  reader.check_root(data_dir)
  # Preparing reads the split files again and warns about their sizes then.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", io_utils.SplitSizeWarning)
    for split in SPLITS:
      reader.split_ids(data_dir, split)


def prepare(builder: tfds.core.DatasetBuilder, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the array_record copy from the extracted folder `data_dir` unless it is up to date.

  A copy prepared from another folder, or from this folder before its split files were rewritten,
  is deleted and prepared again, once `data_dir` is found to hold the dataset's split files. Only
  the split files are fingerprinted: after editing an image or label file in place, delete the
  prepared copy (or touch a split file) to have it prepared again. Where `data_dir` is absent, an
  existing copy is used as it is.

  Returns:
    A builder reading the prepared copy.
  """
  dataset = builder.DATASET
  fingerprint = source_fingerprint(dataset, data_dir)
  stored_path = os.path.join(os.fspath(builder.data_dir), FINGERPRINT_FILE)
  if builder.is_prepared():
    if fingerprint is None:
      return builder
    stored = None
    if os.path.isfile(stored_path):
      with open(stored_path, encoding="utf-8") as f:
        try:
          stored = json.load(f)
        except json.JSONDecodeError:  # a run killed while writing it: prepare again
          stored = None
    if stored == fingerprint:
      return builder
  # Before anything is deleted: a data_dir pointing at the wrong folder must not cost a good copy.
  _check_source(dataset, data_dir)
  if builder.is_prepared():
    logging.warning("The prepared copy %s does not match %s (changed or another folder); "
                    "preparing it again.", builder.data_dir, data_dir)
    shutil.rmtree(os.fspath(builder.data_dir))
    builder = type(builder)(data_dir=builder.data_dir_root, config=builder.builder_config.name,
                            file_format=FILE_FORMAT)
  if os.path.isdir(os.fspath(builder.data_dir)) and not builder.is_prepared():
    # What a run killed while preparing or deleting a copy left: tfds would not rename its new
    # copy onto it.
    shutil.rmtree(os.fspath(builder.data_dir))
  builder.download_and_prepare(
      file_format=FILE_FORMAT,
      download_config=tfds.download.DownloadConfig(
          manual_dir=data_dir, try_download_gcs=False))
  # Written whole or not at all: a run killed meanwhile prepares the copy again.
  with open(stored_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(fingerprint, f, indent=2)
  os.replace(stored_path + ".tmp", stored_path)
  return builder
