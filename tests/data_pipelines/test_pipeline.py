"""Synthetic folder -> tfds builder -> grain pipelines: batch format, order, determinism, resuming."""

import os
import re
import threading
import time
import warnings

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import config as config_lib
from data_pipelines import io_utils
from data_pipelines import pipeline
from data_pipelines import synthetic
from data_pipelines import transforms

SIZE = (32, 48)
NUM_TRAIN, NUM_VAL = 10, 5


def make_config(name: str, data_dir: str, prepared_dir: str = "", **overrides):
  cfg = config_lib.get_dataset_config(name)
  cfg.data_dir = data_dir
  cfg.prepared_dir = prepared_dir
  cfg.train_size = cfg.eval_size = cfg.eval_label_size = SIZE
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope="module", params=["nyud", "pascal"])
def dataset(request, tmp_path_factory):
  """(name, config) of a tiny synthetic dataset, prepared once per module."""
  name = request.param
  root = tmp_path_factory.mktemp(name) / f"{name.upper()}_MT"
  synthetic.WRITERS[name](str(root), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3,
                          height=SIZE[0], width=SIZE[1])
  cfg = make_config(name, str(root))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", io_utils.SplitSizeWarning)
    assert pipeline.num_examples(cfg, "train") == NUM_TRAIN
  return name, cfg


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_config_keys_and_unknown_dataset():
  nyud = config_lib.get_dataset_config("nyud")
  pascal = config_lib.get_dataset_config("pascal")
  assert tuple(nyud.tasks) == ("semseg", "depth")
  assert tuple(pascal.tasks) == ("semseg", "human_parts", "sal")
  assert tuple(nyud.train_size) == (480, 640) and tuple(pascal.eval_label_size) == (512, 512)
  assert nyud.train_split == "train" and nyud.eval_split == "val" and nyud.num_workers == 0
  with pytest.raises(ValueError, match="unknown dataset 'cityscapes'"):
    config_lib.get_dataset_config("cityscapes")


def test_train_batches_have_the_contract_format(dataset):
  name, cfg = dataset
  batch = next(iter(pipeline.create_train_dataset(cfg, 4, seed=0)))
  expected = {"nyud": {"image", "semseg", "depth"},
              "pascal": {"image", "semseg", "human_parts", "sal"}}[name]
  assert set(batch) == expected
  assert batch["image"].shape == (4, *SIZE, 3) and batch["image"].dtype == np.float32
  # ImageNet normalisation of [0, 255] spans about [-2.12, 2.64].
  assert -2.2 < batch["image"].min() < -0.5 and 1.0 < batch["image"].max() < 2.7
  for task in expected - {"image"}:
    assert batch[task].shape == (4, *SIZE)
  if name == "nyud":
    assert batch["semseg"].dtype == np.int32
    values = np.unique(batch["semseg"])
    assert set(values) <= set(range(40)) | {255} and 255 in values and values.min() < 40
    assert batch["depth"].dtype == np.float32
    assert batch["depth"].min() == 0.0 and 0.5 < batch["depth"].max() < 10
  else:
    assert set(np.unique(batch["semseg"])) <= set(range(21)) | {255}
    assert set(np.unique(batch["human_parts"])) <= set(range(7)) | {255}
    assert set(np.unique(batch["sal"])) == {0, 1}
    assert all(batch[t].dtype == np.int32 for t in ("semseg", "human_parts", "sal"))


def test_eval_batches_in_order_padded_with_original_size_labels(dataset):
  name, cfg = dataset
  batches = list(pipeline.create_eval_dataset(cfg, 2))
  assert len(batches) == 3 == len(pipeline.create_eval_dataset(cfg, 2))
  ids = np.concatenate([b["image_id"] for b in batches])
  masks = np.concatenate([b["example_mask"] for b in batches])
  assert masks.tolist() == [True] * 5 + [False]
  prefix = {"nyud": "", "pascal": "2009_"}[name]
  assert ids[:5].tolist() == [f"{prefix}{i:06d}" for i in range(NUM_TRAIN, NUM_TRAIN + NUM_VAL)]
  last = batches[-1]
  for task in cfg.tasks:
    fill = 0.0 if task == "depth" else 255
    assert np.all(last[task][1] == fill)
  for batch in batches:
    assert batch["image"].shape == (2, *SIZE, 3)
    assert batch["original_size"].dtype == np.int32 and batch["example_mask"].dtype == bool
    for i, (h, w) in enumerate(batch["original_size"]):
      if not batch["example_mask"][i]:
        continue
      assert h <= SIZE[0] and w <= SIZE[1]
      label = batch["semseg"][i]
      # Outside the original-size region the canvas is ignore.
      assert np.all(label[h:] == 255) and np.all(label[:, w:] == 255)
  # A fresh pass each time, and max_eval_examples cuts the split.
  assert_batches_equal(batches, list(pipeline.create_eval_dataset(cfg, 2)))
  cut = make_config(name, cfg.data_dir, max_eval_examples=3)
  assert np.concatenate([b["example_mask"] for b in pipeline.create_eval_dataset(cut, 2)]).sum() == 3


def test_same_seed_same_batches_other_seed_differs(dataset):
  _, cfg = dataset
  first = take(iter(pipeline.create_train_dataset(cfg, 4, seed=7)), 3)
  again = take(iter(pipeline.create_train_dataset(cfg, 4, seed=7)), 3)
  other = take(iter(pipeline.create_train_dataset(cfg, 4, seed=8)), 3)
  assert_batches_equal(first, again)
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_epochs_reshuffle_and_drop_the_remainder(dataset):
  name, cfg = dataset
  # No augmentation: each image then identifies its example.
  plain = make_config(name, cfg.data_dir, augment=False)
  batches = list(pipeline.create_train_dataset(plain, 4, seed=1, num_epochs=2))
  assert len(batches) == 2 * (NUM_TRAIN // 4)  # 2 full batches per epoch; 2 examples dropped
  keys = [[b["image"][i].tobytes() for i in range(4)] for b in batches]
  epoch1, epoch2 = sum(keys[:2], []), sum(keys[2:], [])
  assert len(set(epoch1)) == 8 and len(set(epoch2)) == 8
  assert epoch1 != epoch2


def test_hosts_read_disjoint_examples(dataset):
  name, cfg = dataset
  plain = make_config(name, cfg.data_dir, augment=False)
  seen = []
  for host in range(2):
    batches = list(pipeline.create_train_dataset(plain, 4, seed=0, shard_index=host,
                                                 shard_count=2, num_epochs=1))
    assert len(batches) == 2 and batches[0]["image"].shape[0] == 2
    seen.append({b["image"][i].tobytes() for b in batches for i in range(2)})
  assert len(seen[0]) == 4 and not seen[0] & seen[1]
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.create_train_dataset(plain, 3, seed=0, shard_count=2)


def test_hosts_batches_put_together_are_one_hosts_batches(dataset):
  """Each host reads its part of every global batch, augmented the same: the global batches do
  not depend on the number of hosts (a run on 2 hosts is the run on 1 host with 2 devices)."""
  _, cfg = dataset
  single = take(iter(pipeline.create_train_dataset(cfg, 4, seed=3)), 5)  # 2.5 epochs
  hosts = [take(iter(pipeline.create_train_dataset(cfg, 4, seed=3, shard_index=i,
                                                   shard_count=2)), 5) for i in range(2)]
  for step, batch in enumerate(single):
    for key, value in batch.items():
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), value, err_msg=key)


def test_a_host_without_eval_examples_yields_padding(dataset):
  name, cfg = dataset
  one = make_config(name, cfg.data_dir, max_eval_examples=1)
  host0, host1 = (list(pipeline.create_eval_dataset(one, 2, shard_index=i, shard_count=2))
                  for i in range(2))
  assert len(host0) == len(host1) == 1  # the sharded eval steps line up
  assert host0[0]["example_mask"].tolist() == [True, False]
  assert not host1[0]["example_mask"].any()
  assert host0[0].keys() == host1[0].keys()
  for key in host0[0]:
    assert host1[0][key].shape == host0[0][key].shape and host1[0][key].dtype == host0[0][key].dtype
  for task in cfg.tasks:  # labels of padding are ignored
    ignore = 0 if task == "depth" else 255
    assert (host1[0][task] == ignore).all()


def test_resume_mid_epoch_equals_uninterrupted(dataset, tmp_path):
  _, cfg = dataset
  reference = take(iter(pipeline.create_train_dataset(cfg, 4, seed=5)), 6)
  it = iter(pipeline.create_train_dataset(cfg, 4, seed=5))
  take(it, 3)  # mid second epoch (2 batches per epoch)
  state = it.get_state()
  resumed = iter(pipeline.create_train_dataset(cfg, 4, seed=5))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), reference[3:])

  # The same through orbax, as the trainer checkpoints it.
  it = iter(pipeline.create_train_dataset(cfg, 4, seed=5))
  take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    fresh = iter(pipeline.create_train_dataset(cfg, 4, seed=5))
    manager.restore(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(fresh, 2), reference[4:])


def test_worker_processes_give_the_same_batches_and_resume(dataset):
  name, cfg = dataset
  reference = take(iter(pipeline.create_train_dataset(cfg, 2, seed=2)), 5)
  parallel = make_config(name, cfg.data_dir, num_workers=2, worker_buffer_size=1)
  it = iter(pipeline.create_train_dataset(parallel, 2, seed=2))
  try:
    assert_batches_equal(take(it, 3), reference[:3])
    state = it.get_state()
  finally:
    it.close()
  resumed = iter(pipeline.create_train_dataset(parallel, 2, seed=2))
  try:
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), reference[3:])
  finally:
    resumed.close()


def test_read_threads_run_concurrently_and_give_the_same_batches(dataset, monkeypatch):
  """dataset.read_threads threads each produce a batch at the same time (grain's prefetch buffer
  holds at least as many batches as there are threads), in the single-threaded order."""
  name, cfg = dataset
  reference = take(iter(pipeline.create_train_dataset(cfg, 1, seed=4)), 8)
  lock, active, most = threading.Lock(), [0], [0]
  transform = transforms.TrainTransform.random_map

  def slow_transform(self, element, rng):
    with lock:
      active[0] += 1
      most[0] = max(most[0], active[0])
    time.sleep(0.2)  # sleeps release the GIL, as the decoders and resizes do
    try:
      return transform(self, element, rng)
    finally:
      with lock:
        active[0] -= 1

  monkeypatch.setattr(transforms.TrainTransform, "random_map", slow_transform)
  threaded = make_config(name, cfg.data_dir, read_threads=4)
  assert_batches_equal(take(iter(pipeline.create_train_dataset(threaded, 1, seed=4)), 8),
                       reference)
  assert most[0] == 4


def test_read_threads_default_to_the_cores_shared_among_the_processes(monkeypatch):
  cfg = config_lib.get_dataset_config("nyud")
  assert cfg.read_threads == -1
  assert 1 <= pipeline.available_cores() <= (os.cpu_count() or 1)
  monkeypatch.setattr(pipeline, "available_cores", lambda: 16)
  assert pipeline.read_threads(cfg) == 8  # at most 8
  cfg.num_workers = 4
  assert pipeline.read_threads(cfg) == 4  # 16 cores among 4 worker processes
  monkeypatch.setattr(pipeline, "available_cores", lambda: 2)
  assert pipeline.read_threads(cfg) == 1
  cfg.num_workers = 0
  assert pipeline.read_threads(cfg) == 2
  cfg.read_threads = 3
  assert pipeline.read_threads(cfg) == 3
  for bad in (0, -2):
    cfg.read_threads = bad
    with pytest.raises(ValueError, match=rf"dataset.read_threads must be .* got {bad}"):
      pipeline.read_threads(cfg)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_read_threads_follow_the_cores_a_pinned_process_may_use():
  cfg = config_lib.get_dataset_config("nyud")
  allowed = os.sched_getaffinity(0)
  try:
    os.sched_setaffinity(0, {min(allowed)})  # as a container pinned to one core
    assert pipeline.available_cores() == 1 and pipeline.read_threads(cfg) == 1
  finally:
    os.sched_setaffinity(0, allowed)
  assert pipeline.available_cores() == len(allowed)


def test_input_pipeline_benchmark_smoke(capsys):
  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
  assert input_pipeline.main(["--height", "24", "--width", "32", "--steps", "2", "--warmup", "1",
                              "--batch-size", "2", "--num-train", "4", "--workers", "0",
                              "--read-threads", "1", "3"]) == 0
  out = capsys.readouterr().out
  assert "wrote 4 synthetic 24x32 frames" in out
  rates = dict(re.findall(r"read_threads=(\d+), workers=0: ([\d.]+) images/s", out))
  assert set(rates) == {"1", "3"} and all(float(r) > 0 for r in rates.values())
