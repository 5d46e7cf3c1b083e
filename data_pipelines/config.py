"""Dataset configurations (`config.dataset` of a training config).

`get_dataset_config("nyud")` / `get_dataset_config("pascal")` give the paper's setting; experiment
configs override fields (sizes, folders, workers). Every value is a plain Python value so that the
config serialises to JSON and can be set from the command line.
"""

import ml_collections

# Published tasks of each dataset, in the order the heads and metrics use.
DATASET_TASKS = {
    "nyud": ("semseg", "depth"),
    "pascal": ("semseg", "human_parts", "sal"),
}

# Spatial sizes (height, width). `eval_label_size` is the canvas the labels are padded into at their
# original size: NYUD-v2 frames are all 480x640, PASCAL images are at most 500 pixels a side.
_SIZES = {
    "nyud": {"train_size": (480, 640), "eval_size": (480, 640), "eval_label_size": (480, 640)},
    "pascal": {"train_size": (512, 512), "eval_size": (512, 512), "eval_label_size": (512, 512)},
}

# The survey code's augmentations: NYUD-v2 zooms about the centre; PASCAL rotates and scales.
_AUGMENT = {
    "nyud": {"zoom_scales": (1.0, 1.2, 1.5), "max_rotation": 0.0, "scale_range": (1.0, 1.0)},
    "pascal": {"zoom_scales": (1.0,), "max_rotation": 20.0, "scale_range": (0.75, 1.25)},
}


def get_dataset_config(name: str) -> ml_collections.ConfigDict:
  """The input pipeline's settings for one dataset.

  Args:
    name: "nyud" (NYUD-v2, NYUD_MT layout) or "pascal" (PASCAL-Context, PASCAL_MT layout).

  Returns:
    A ConfigDict with the keys
      name: the dataset name.
      data_dir: the extracted NYUD_MT / PASCAL_MT folder ("" = not set).
      prepared_dir: where the prepared tensorflow-datasets (array_record) copy is written;
        "" = `<data_dir>_tfds` next to the data folder.
      tasks: the tasks whose labels are read (only their files are required); the paper's by
        default, up to iterfuse_jax.tasks.FULL_TASKS (adding normals and edge).
      train_split, eval_split: split names ("train" / "val" as published).
      train_size, eval_size: (height, width) of the network input.
      eval_label_size: (height, width) canvas holding the original-size eval labels.
      augment: whether training applies the reference augmentations, whose ranges are
        flip_probability, zoom_scales (discrete centre zooms, depth divided by the zoom),
        max_rotation (degrees) and scale_range (continuous scale about the centre).
      num_workers: grain worker processes (0 = in the main process).
      worker_buffer_size: batches each worker keeps ready.
      read_threads: threads per process producing batches, each one batch at a time (reading,
        decoding and augmenting; the decoders and resizes release the GIL), so on a host
        with many cores they add throughput without worker processes; -1: the cores this
        process may use, shared among the worker processes, at most 8 (pipeline.read_threads).
      max_eval_examples: evaluate on the first N examples only (-1 = all).

  Raises:
    ValueError: for an unknown dataset name.
  """
  if name not in DATASET_TASKS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_TASKS)}")
  sizes = _SIZES[name]
  return ml_collections.ConfigDict({
      "name": name,
      "data_dir": "",
      "prepared_dir": "",
      "tasks": DATASET_TASKS[name],
      "train_split": "train",
      "eval_split": "val",
      "train_size": sizes["train_size"],
      "eval_size": sizes["eval_size"],
      "eval_label_size": sizes["eval_label_size"],
      "augment": True,
      "flip_probability": 0.5,
      **_AUGMENT[name],
      "num_workers": 0,
      "worker_buffer_size": 2,
      "read_threads": -1,
      "max_eval_examples": -1,
  })
