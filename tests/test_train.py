"""The training loop end to end on tiny synthetic data: learning, resuming, data parallel, logs."""

import functools
import glob
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from configs import demo as demo_config
from configs import nyud_ifbC
from iterfuse_jax import inference, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = (48, 64)
STEPS = 16


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Several runs below compile the same steps: share them through the persistent cache."""
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_pipelines import synthetic
  path = tmp_path_factory.mktemp("data") / "NYUD_MT"
  synthetic.write_nyud(str(path), num_train=8, num_val=4, seed=0, height=SIZE[0], width=SIZE[1])
  return str(path)


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The demo config shrunk to seconds: 48x64 images, 8 channels, 2 IFB iterations."""
  config = ml_collections.ConfigDict(demo_config.get_config().to_dict())
  config.dataset.data_dir = data_dir
  config.dataset.train_size = config.dataset.eval_size = config.dataset.eval_label_size = SIZE
  config.synthetic_data.enabled = False
  config.model.task_channels = 8
  config.model.tpim.n_iter = 2
  config.batch_size = 4
  config.num_train_steps = STEPS
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 1000  # only the final evaluation
  config.num_eval_images = 2
  config.num_devices = 1
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(data_dir)
  results = train.train_and_evaluate(config, str(workdir))
  return config, workdir, results


def _event_records(workdir):
  """(tag, plugin, step, value-or-None) of every summary in the run's TensorBoard files."""
  import tensorflow as tf
  records = []
  for path in glob.glob(str(workdir / "**" / "events.out.tfevents.*"), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        number = None
        if plugin == "scalars" or value.HasField("simple_value"):
          number = (value.simple_value if value.HasField("simple_value")
                    else float(tf.make_ndarray(value.tensor)))
        records.append((value.tag, plugin, event.step, number))
  return records


def test_run_learns_and_leaves_its_artifacts(finished_run):
  config, workdir, results = finished_run
  records = _event_records(workdir)
  losses = [(step, v) for tag, _, step, v in records if tag == "loss/total"]
  assert len(losses) == STEPS // config.log_every_steps
  losses = [v for _, v in sorted(losses)]
  assert losses[-1] < 0.8 * losses[0], f"loss did not fall: {losses}"
  tags = {tag for tag, *_ in records}
  for tag in ("loss/final/semseg", "loss/initial/depth", "learning_rate", "images_per_second",
              "eval/semseg/miou", "eval/depth/rmse", "eval/delta_m"):
    assert tag in tags, f"{tag} missing from the TensorBoard events ({sorted(tags)})"
  images = {tag for tag, plugin, *_ in records if plugin == "images"}
  assert {"eval/input", "eval/semseg/prediction", "eval/semseg/ground_truth",
          "eval/depth/prediction"} <= images

  assert set(json.loads((workdir / "metrics.json").read_text())) == set(results)
  assert np.isfinite(results["delta_m"])
  assert 0 <= results["semseg/miou"] <= 1 or 0 <= results["semseg/miou"] <= 100
  assert (workdir / "metrics.md").exists()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [8, 12, 16]  # keep_checkpoints = 3
  assert any(p.name.isdigit() for p in (workdir / "best").iterdir())
  assert len(list((workdir / "predictions").glob("example_*.png"))) == config.num_eval_images
  assert json.loads((workdir / "config.json").read_text())["model"]["task_channels"] == 8


def _final_params(workdir, config):
  variables, step = inference.restore_variables(workdir, config)
  return jax.tree.map(np.asarray, variables), step


def test_killed_run_resumes_exactly(finished_run, tmp_path, data_dir, monkeypatch):
  config, reference_dir, _ = finished_run
  calls = {"n": 0}
  real_shard = train.shard_batch

  def dies_at_step_7(batch, sharding):
    calls["n"] += 1
    if calls["n"] == 7:
      raise KeyboardInterrupt("simulated kill")
    return real_shard(batch, sharding)

  monkeypatch.setattr(train, "shard_batch", dies_at_step_7)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(train, "shard_batch", real_shard)
  assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == 4

  train.train_and_evaluate(config, str(tmp_path))  # resumes from step 4
  resumed, step = _final_params(tmp_path, config)
  reference, ref_step = _final_params(reference_dir, config)
  assert step == ref_step == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               resumed, reference)


def test_eval_mode_reproduces_the_final_evaluation(finished_run):
  config, workdir, results = finished_run
  again = train.evaluate_checkpoint(config, str(workdir), which="latest")
  for key, value in results.items():
    np.testing.assert_allclose(again[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_two_device_step_equals_one_device_step(data_dir):
  if len(jax.devices()) < 2:  # ITERFUSE_TEST_PLATFORM=gpu on a one-GPU machine
    pytest.skip(f"needs 2 devices, found {jax.devices()}")
  # SGD: the update is linear in the gradient. Adam's first step is lr * sign(g) for every
  # parameter, so float noise on a near-zero gradient would flip a whole lr-sized step.
  config = tiny_config(data_dir, batch_size=4, **{"optimizer.name": "sgd"})
  from data_pipelines import pipeline
  batch = next(iter(pipeline.create_train_dataset(config.dataset, 4, seed=0)))
  model = train.build_model(config)
  schedule = train.create_learning_rate_schedule(config, 2)
  tx = train.create_optimizer(config, schedule)
  new_params = []
  for n in (1, 2):
    mesh = train.create_mesh(n)
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = train.create_train_state(config, model, tx, jax.random.key(0), (1, *SIZE, 3), mesh)
    step = jax.jit(functools.partial(train.train_step, tasks=tuple(config.dataset.tasks),
                                     loss_weights=dict(config.loss_weights), schedule=schedule),
                   out_shardings=(jax.tree.map(lambda _: replicated, state), replicated))
    sharded = train.shard_batch(batch, data)
    assert len(sharded["image"].sharding.device_set) == n
    state, metrics = step(state, sharded)
    new_params.append(jax.device_get((state.params, state.batch_stats, metrics)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), *new_params)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir,
                                                                  monkeypatch):
  config = tiny_config(data_dir, num_train_steps=8, checkpoint_every_steps=2)
  calls = {"n": 0}
  real_shard = train.shard_batch

  def nan_at_step_3(batch, sharding):
    calls["n"] += 1
    batch = dict(batch)
    if calls["n"] == 3:
      batch["image"] = np.full_like(batch["image"], np.nan)
    return real_shard(batch, sharding)

  monkeypatch.setattr(train, "shard_batch", nan_at_step_3)
  with pytest.raises(train.NonFiniteLossError, match="step 3.*last good checkpoint is step 2"):
    train.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]
  variables, _ = inference.restore_variables(tmp_path, config)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def _parse(argv):
  flag_values = flags.FlagValues()
  argv = ["launch.py", *argv]
  # As launch.py declares it; the overrides are read from `sys_argv` (sys.argv in launch.py).
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_config_overrides_and_unknown_keys():
  path = str(REPO_ROOT / "configs" / "nyud_ifbC.py")
  config = _parse([f"--config={path}", "--config.num_train_steps=20",
                   "--config.dataset.data_dir=/data/NYUD_MT", "--config.model.tpim.n_iter=4"])
  assert config.num_train_steps == 20
  assert config.dataset.data_dir == "/data/NYUD_MT"
  assert config.model.tpim.n_iter == 4
  assert config.model.tpim.variant == "C" and config.model.tpim.alpha_init == 0.3
  with pytest.raises(AttributeError, match='n_iters.*Did you mean "n_iter"'):
    _parse([f"--config={path}", "--config.model.tpim.n_iters=4"])
  with pytest.raises(AttributeError):
    nyud_ifbC.get_config().not_a_key = 1  # locked: misspelt keys in experiment files fail too


def test_paper_settings_of_the_nyud_config():
  config = nyud_ifbC.get_config()
  assert config.model.backbone == "w18_small_v2"
  assert (config.model.tpim.variant, config.model.tpim.n_iter) == ("C", 18)
  assert config.batch_size == 8 and config.num_epochs == 100
  opt = config.optimizer
  assert (opt.name, opt.learning_rate, opt.weight_decay, opt.poly_power) == ("adam", 1e-4, 1e-4, 0.9)


def test_poly_schedule_steps_per_epoch():
  config = ml_collections.ConfigDict(nyud_ifbC.get_config().to_dict())
  schedule = train.create_learning_rate_schedule(config, epoch_steps=10)
  lr = [float(schedule(s)) for s in (0, 9, 10, 19, 20, 999)]
  assert lr[0] == lr[1] == pytest.approx(1e-4)
  assert lr[2] == lr[3] == pytest.approx(1e-4 * (1 - 1 / 100) ** 0.9)
  assert lr[4] == pytest.approx(1e-4 * (1 - 2 / 100) ** 0.9)
  assert lr[5] == pytest.approx(1e-4 * (1 - 99 / 100) ** 0.9)


def test_adam_adds_l2_decay_to_the_gradient():
  config = ml_collections.ConfigDict(nyud_ifbC.get_config().to_dict())
  tx = train.create_optimizer(config, lambda step: 0.1)
  params = {"w": jnp.array([1.0, -2.0])}
  updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
  # Zero gradient: Adam normalises the decay term 1e-4 * w to a step of -lr * sign(w).
  np.testing.assert_allclose(updates["w"], [-0.1, 0.1], rtol=1e-3)


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = ml_collections.ConfigDict(nyud_ifbC.get_config().to_dict())
  config.dataset.data_dir = str(tmp_path / "NYUD_MT")
  with pytest.raises(FileNotFoundError, match="NYUD_MT"):
    train.train_and_evaluate(config, str(tmp_path / "work"))


@pytest.mark.slow
def test_bfloat16_trains_like_float32(data_dir):
  """bfloat16 activations (float32 parameters, softmax and IFB accumulation) learn as float32 does.

  Both fit the same two batches for 12 steps from the same initialisation; the bfloat16 loss
  curve must fall about as far as the float32 one (at least 80% of its drop) and stay close.
  """
  from data_pipelines import pipeline
  curves = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(data_dir, **{"model.dtype": dtype})
    batches = iter(pipeline.create_train_dataset(config.dataset, 4, seed=0))
    mesh = train.create_mesh(1)
    data = NamedSharding(mesh, PartitionSpec("data"))
    batches = [train.shard_batch(next(batches), data) for _ in range(2)]
    schedule = train.create_learning_rate_schedule(config, 100)
    model = train.build_model(config)
    state = train.create_train_state(config, model, train.create_optimizer(config, schedule),
                                     jax.random.key(0), (1, *SIZE, 3), mesh)
    step = jax.jit(functools.partial(train.train_step, tasks=tuple(config.dataset.tasks),
                                     loss_weights=dict(config.loss_weights), schedule=schedule))
    losses = []
    for i in range(12):
      state, metrics = step(state, batches[i % 2])
      losses.append(float(metrics["loss/total"]))
    assert int(state.nonfinite_step) == -1
    curves[dtype] = np.array(losses)
  f32, bf16 = curves["float32"], curves["bfloat16"]
  # Equal curves would mean model.dtype was ignored (tests/test_precision.py checks the HLO).
  assert not np.array_equal(bf16, f32), curves
  np.testing.assert_allclose(bf16[:2], f32[:2], rtol=0.05)  # same start
  drop32 = f32[:2].mean() - f32[-2:].mean()
  drop16 = bf16[:2].mean() - bf16[-2:].mean()
  assert drop32 > 0.1 * f32[:2].mean(), curves  # float32 does learn these two batches
  assert drop16 >= 0.8 * drop32, curves


def test_launch_without_dataset_exits_with_the_message(tmp_path):
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "launch.py"), f"--config={REPO_ROOT}/configs/nyud_ifbC.py",
       f"--workdir={tmp_path}", f"--config.dataset.data_dir={tmp_path}/NYUD_MT"],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 1
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: ") and f"{tmp_path}/NYUD_MT" in last_line, result.stderr
  assert "Traceback" not in result.stderr
