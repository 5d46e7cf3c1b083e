"""grain input pipelines for training and evaluation, from a dataset config (`config.py`).

The extracted NYUD_MT / PASCAL_MT folder is prepared once into an array_record copy by the
tensorflow-datasets builders (`builders.py`) and then read with random access by grain; nothing
here uses TensorFlow.

Batches are dicts of numpy arrays:
  image        float32 [B, H, W, 3], ImageNet-normalised
  semseg, human_parts   int32 [B, H, W], 255 = ignore
  sal, edge    int32 [B, H, W], 0/1 (255 = ignore, padding only)
  depth        float32 [B, H, W], metres, 0 = invalid
  normals      float32 [B, H, W, 3], unit vectors, all-zero = invalid
Evaluation batches also carry original_size int32 [B, 2] (height, width), example_mask bool [B]
and image_id (str [B]); their labels are at the original size, top-left in an eval_label_size
canvas padded with ignore (depth and normals 0).
"""

import math
import os
from collections.abc import Iterator

from absl import flags
import grain
import ml_collections
import numpy as np

from data_pipelines import builders
from data_pipelines import transforms

_READ_PREFETCH_BATCHES = 2


def prepared_dir(cfg: ml_collections.ConfigDict) -> str:
  """Where the array_record copy lives: cfg.prepared_dir, else `<data_dir>_tfds`."""
  if cfg.get("prepared_dir", ""):
    return os.fspath(cfg.prepared_dir)
  if not cfg.data_dir:
    builders.READERS[cfg.name].check_root("")  # raises, saying how to get the data
  return os.path.normpath(os.fspath(cfg.data_dir)) + "_tfds"


def load_source(cfg: ml_collections.ConfigDict, split: str):
  """A random-access source of decoded records of `split`, preparing the dataset if needed.

  Raises:
    FileNotFoundError: the data folder (or a file in it) is missing.
    io_utils.DataError: a file of the dataset is malformed (the message names it).
  """
  builder = builders.get_builder(cfg.name, tuple(cfg.tasks), prepared_dir(cfg))
  builder = builders.prepare(builder, os.fspath(cfg.data_dir))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in the prepared {builder.name} at {builder.data_dir}; "
                     f"available: {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def num_examples(cfg: ml_collections.ConfigDict, split: str) -> int:
  """The number of examples of a split (preparing the dataset if needed)."""
  return len(load_source(cfg, split))


def augment_params(cfg: ml_collections.ConfigDict) -> transforms.AugmentParams | None:
  if not cfg.get("augment", True):
    return None
  defaults = transforms.AugmentParams()
  return transforms.AugmentParams(
      flip_probability=float(cfg.get("flip_probability", defaults.flip_probability)),
      zoom_scales=tuple(float(z) for z in cfg.get("zoom_scales", defaults.zoom_scales)),
      max_rotation=float(cfg.get("max_rotation", defaults.max_rotation)),
      scale_range=tuple(float(s) for s in cfg.get("scale_range", defaults.scale_range)))


def _read_options(cfg: ml_collections.ConfigDict) -> grain.ReadOptions:
  threads = max(1, int(cfg.get("read_threads", 2)))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=_READ_PREFETCH_BATCHES)


def _with_workers(ds: grain.IterDataset, cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  workers = int(cfg.get("num_workers", 0))
  if workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():
    # grain's worker machinery reads its absl flags; outside an absl app (tests, notebooks) nobody
    # parsed them, so take the defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=int(cfg.get("worker_buffer_size", 2))))


def _split_seed(seed: int, shard_index: int) -> int:
  """A 32-bit augmentation seed per host, so that hosts draw independent augmentations."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def create_train_dataset(cfg: ml_collections.ConfigDict, global_batch_size: int, seed: int, *,
                         shard_index: int = 0, shard_count: int = 1,
                         num_epochs: int | None = None) -> grain.IterDataset:
  """The training pipeline of this host.

  Each host reads every `shard_count`-th example (starting at `shard_index`) of the train split,
  reshuffles its part every epoch with `seed`, augments each record with an rng derived from the
  seed and the record's position, and batches `global_batch_size // shard_count` examples,
  dropping each epoch's incomplete batch.

  Args:
    cfg: the dataset config.
    global_batch_size: examples per step over all hosts.
    seed: shuffling and augmentation seed.
    shard_index, shard_count: this host's index and the number of hosts.
    num_epochs: epochs to yield (None: repeat forever).

  Returns:
    A grain IterDataset; `iter()` gives a checkpointable iterator (`get_state` / `set_state`,
    `grain.checkpoint.CheckpointSave` / `CheckpointRestore`) of batches (module docstring).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  if global_batch_size % shard_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{shard_count} hosts")
  batch_size = global_batch_size // shard_count
  source = load_source(cfg, cfg.train_split)
  per_host = len(source) // shard_count
  ds = grain.MapDataset.source(source)[shard_index:per_host * shard_count:shard_count]
  keep = per_host // batch_size * batch_size
  if keep == 0:
    raise ValueError(f"the {cfg.train_split} split has {len(source)} examples, {per_host} per "
                     f"host: fewer than one batch of {batch_size}")
  # Shuffle, then keep whole batches of each epoch; slicing a shuffled dataset keeps the per-epoch
  # reshuffle of `repeat`.
  ds = ds.shuffle(seed=seed)[:keep].repeat(num_epochs)
  ds = ds.random_map(
      transforms.TrainTransform(cfg.tasks, cfg.train_size, augment_params(cfg)),
      seed=_split_seed(seed, shard_index))
  ds = ds.batch(batch_size, drop_remainder=True)
  return _with_workers(ds.to_iter_dataset(_read_options(cfg)), cfg)


class EvalBatches:
  """The eval split as batches, in order; a fresh pass each time it is iterated.

  The last batch is completed with padding examples (example_mask False, labels all ignore), so
  that every batch has `batch_size` examples.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, batch_size: int, shard_index: int = 0,
               shard_count: int = 1):
    source = load_source(cfg, cfg.eval_split)
    total = len(source)
    if cfg.get("max_eval_examples", -1) and cfg.max_eval_examples > 0:
      total = min(total, int(cfg.max_eval_examples))
    self.batch_size = batch_size
    self.tasks = tuple(cfg.tasks)
    self.num_examples = len(range(shard_index, total, shard_count))
    # Every host runs the same number of batches, whatever its share of the remainder.
    self.num_batches = math.ceil(math.ceil(total / shard_count) / batch_size)
    ds = grain.MapDataset.source(source)[shard_index:total:shard_count]
    ds = ds.map(transforms.EvalTransform(cfg.tasks, cfg.eval_size, cfg.eval_label_size))
    self._dataset = _with_workers(
        ds.batch(batch_size, drop_remainder=False).to_iter_dataset(_read_options(cfg)), cfg)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    count = 0
    template = None
    for batch in self._dataset:
      template = batch
      count += 1
      yield self._pad(batch)
    while count < self.num_batches:  # a host whose share ran out early
      count += 1
      yield self._pad({k: v[:0] for k, v in template.items()}, template)

  def _pad(self, batch: dict[str, np.ndarray], template: dict | None = None) -> dict:
    n = len(batch["example_mask"])
    missing = self.batch_size - n
    if missing == 0:
      return batch
    template = template or batch
    out = {}
    for key, value in batch.items():
      filler = np.repeat(template[key][:1], missing, axis=0)
      if key in self.tasks:
        filler[:] = transforms.label_fill(key)
      elif key == "example_mask":
        filler[:] = False
      elif key == "image_id":
        filler = np.full(missing, "", dtype=value.dtype)
      out[key] = np.concatenate([value, filler], axis=0)
    return out


def create_eval_dataset(cfg: ml_collections.ConfigDict, batch_size: int, *, shard_index: int = 0,
                        shard_count: int = 1) -> EvalBatches:
  """The eval split in order, in batches of `batch_size` (this host's), the last one padded.

  Args:
    cfg: the dataset config (eval_split, eval_size, eval_label_size, max_eval_examples).
    batch_size: examples per batch on this host.
    shard_index, shard_count: this host takes every `shard_count`-th example.

  Returns:
    An iterable of batches (module docstring); each `iter()` starts a fresh pass.
  """
  return EvalBatches(cfg, batch_size, shard_index, shard_count)
