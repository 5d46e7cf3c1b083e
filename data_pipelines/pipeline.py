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
import signal
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


_MAX_AUTO_READ_THREADS = 8


def read_threads(cfg: ml_collections.ConfigDict) -> int:
  """The threads of each process producing batches: cfg.read_threads, or with -1 (the default)
  the cores this process may use (`available_cores`) shared among the worker processes (all of
  them with none), at most 8.

  Raises:
    ValueError: read_threads is neither -1 nor a positive count.
  """
  value = cfg.get("read_threads", -1)
  if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
    raise ValueError(f"dataset.read_threads must be a positive number of threads or -1 (one per "
                     f"core, at most {_MAX_AUTO_READ_THREADS}), got {value!r}")
  if value > 0:
    return value
  processes = max(1, int(cfg.get("num_workers", 0)))
  return max(1, min(_MAX_AUTO_READ_THREADS, available_cores() // processes))


def available_cores() -> int:
  """The cores this process may run on (its CPU affinity where the OS has one, as in a container
  pinned to some cores; else all of the machine's)."""
  if hasattr(os, "sched_getaffinity"):
    return max(1, len(os.sched_getaffinity(0)))
  return os.cpu_count() or 1


def _read_options(cfg: ml_collections.ConfigDict) -> grain.ReadOptions:
  threads = read_threads(cfg)
  # grain's threads each produce one element (here a whole batch) of the prefetch buffer, so a
  # buffer smaller than the thread count would leave threads idle.
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(_READ_PREFETCH_BATCHES, threads))


def _with_workers(ds: grain.IterDataset, cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  workers = int(cfg.get("num_workers", 0))
  if workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():
    # grain's worker machinery reads its absl flags; outside an absl app (tests, notebooks) nobody
    # parsed them, so take the defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=int(cfg.get("worker_buffer_size", 2))),
      worker_init_fn=_ignore_ctrl_c)


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """In a worker process: Ctrl-C in a terminal reaches every process of the job, and the training
  loop stops after a step with a checkpoint (iterfuse_jax/stopping.py); workers that died of it
  printed a KeyboardInterrupt traceback each. The loop's end stops them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _augment_seed(seed: int) -> int:
  """The 32-bit seed of the augmentation rngs (each record's rng also depends on its position)."""
  return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])


class _HostShare(grain.MapDataset):
  """One host's share of a stream of global batches: of every `global_batch` consecutive
  elements, the `host_batch` elements starting at `shard_index * host_batch`.

  Only the elements of this host are read and transformed; batching the result by `host_batch`
  gives this host's part of each global batch.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, host_batch: int,
               shard_index: int):
    super().__init__(parent)
    self._global_batch, self._host_batch = global_batch, host_batch
    self._offset = shard_index * host_batch

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch * self._host_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, position = divmod(index, self._host_batch)
    return self._parent[batch * self._global_batch + self._offset + position]

  def __str__(self) -> str:
    return (f"_HostShare(global_batch={self._global_batch}, host_batch={self._host_batch}, "
            f"offset={self._offset})")


def create_train_dataset(cfg: ml_collections.ConfigDict, global_batch_size: int, seed: int, *,
                         shard_index: int = 0, shard_count: int = 1,
                         num_epochs: int | None = None) -> grain.IterDataset:
  """The training pipeline of this host.

  The global stream is the same whatever the number of hosts: the train split is reshuffled every
  epoch with `seed`, each epoch's incomplete global batch is dropped, and each record is augmented
  with an rng derived from the seed and the record's position in the stream. Each host reads and
  transforms only its `global_batch_size // shard_count` examples of every global batch (host
  `shard_index` takes the `shard_index`-th part), so the hosts' batches put together are the
  batches of a single host.

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
  keep = len(source) // global_batch_size * global_batch_size
  if keep == 0:
    raise ValueError(f"the {cfg.train_split} split has {len(source)} examples: fewer than one "
                     f"global batch of {global_batch_size}")
  # Shuffle, then keep whole batches of each epoch; slicing a shuffled dataset keeps the per-epoch
  # reshuffle of `repeat`.
  ds = grain.MapDataset.source(source).shuffle(seed=seed)[:keep].repeat(num_epochs)
  ds = ds.random_map(
      transforms.TrainTransform(cfg.tasks, cfg.train_size, augment_params(cfg)),
      seed=_augment_seed(seed))
  if shard_count > 1:
    ds = _HostShare(ds, global_batch_size, batch_size, shard_index)
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
    transform = transforms.EvalTransform(cfg.tasks, cfg.eval_size, cfg.eval_label_size)
    ds = grain.MapDataset.source(source)[shard_index:total:shard_count].map(transform)
    self._dataset = _with_workers(
        ds.batch(batch_size, drop_remainder=False).to_iter_dataset(_read_options(cfg)), cfg)
    # The split's first example gives the padding batches of a host whose share is empty.
    self._first = grain.MapDataset.source(source)[:1].map(transform).batch(1)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    count = 0
    template = None
    for batch in self._dataset:
      template = batch
      count += 1
      yield self._pad(batch)
    if template is None and count < self.num_batches:  # this host's share is empty
      template = self._first[0]
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
