"""The training loop end to end on the tiny demo (configs/demo.py:tiny) on 2 devices: learning,
artifacts, resuming mid-epoch, damaged checkpoints, best and last evaluations, two processes,
SIGKILLs at random moments, the console, and launch.py's exits."""

import contextlib
import functools
import glob
import io
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from configs import demo as demo_config
from configs import nyud_ifbC
from iterfuse_jax import (checkpoints, compare, determinism, evaluations, inference,
                          out_of_memory, prediction_files, train)
from tests import multiprocess, tensorboard_events

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = demo_config.get_config("tiny")  # 12 steps, 2 per epoch; checkpoints 3, 6, 9, 12
SIZE = tuple(TINY.dataset.train_size)
STEPS = TINY.num_epochs * TINY.synthetic_data.num_train // TINY.batch_size
EVAL_STEPS = [8, 10, 12]  # the ends of the last 3 epochs
INFO_LINE = r"^[IW]\d{4} "  # an absl INFO / WARNING log line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny config's synthetic data: the files a tiny run writes itself (same seed and size)."""
  from data_pipelines import synthetic
  syn = TINY.synthetic_data
  path = tmp_path_factory.mktemp("data") / "NYUD_MT"
  synthetic.write_nyud(str(path), num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed,
                       height=syn.height, width=syn.width)
  return str(path)


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """configs/demo.py:tiny on the shared data, with `overrides` ("a.b": value)."""
  config = ml_collections.ConfigDict(TINY.to_dict())
  config.dataset.data_dir = data_dir
  config.synthetic_data.enabled = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def launch(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
  """`python launch.py ARGS` as a user runs it (the session's compilation cache, 2 CPU devices)."""
  return subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), *args],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout, **kwargs)


def tiny_flags(data_dir: str, workdir) -> list[str]:
  return ["--config=configs/demo.py:tiny", f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}", "--config.synthetic_data.enabled=False"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  """The tiny run, uninterrupted, on 2 devices: donated train state on a 2-device mesh, sharded
  batches and evaluation. Returns (config, workdir, results, console text)."""
  assert len(jax.devices()) == 2
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(data_dir)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    results = train.train_and_evaluate(config, str(workdir))
  return config, workdir, results, printed.getvalue()


def _read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def test_run_learns_and_leaves_its_artifacts(finished_run):
  config, workdir, results, printed = finished_run
  records = tensorboard_events.read(workdir)
  losses = [(step, v) for tag, _, step, v in records if tag == "loss/total"]
  assert len(losses) == STEPS // config.log_every_steps
  losses = [v for _, v in sorted(losses)]
  # 12 steps from PyTorch's default head initialisation (configs/default.py model.init): the
  # depth-dominated loss falls ~13% (14.3 -> 12.4); the demo's 240 steps show the learning itself.
  assert losses[-1] < 0.9 * losses[0], f"loss did not fall: {losses}"
  tags = {tag for tag, *_ in records}
  for tag in ("loss/final/semseg", "loss/initial/depth", "learning_rate", "images_per_second",
              "input_fraction", "eval/semseg/miou", "eval/depth/rmse", "eval/delta_m"):
    assert tag in tags, f"{tag} missing from the TensorBoard events ({sorted(tags)})"
  input_fractions = [v for tag, _, _, v in records if tag == "input_fraction"]
  assert len(input_fractions) == len(losses) and all(0 < v < 1 for v in input_fractions), (
      input_fractions)
  assert sorted(step for tag, _, step, _ in records if tag == "eval/delta_m") == EVAL_STEPS
  images = {tag for tag, plugin, *_ in records if plugin == "images"}
  assert {"eval/input", "eval/semseg/prediction", "eval/semseg/ground_truth",
          "eval/depth/prediction"} <= images

  assert _read_json(workdir / "metrics.json") == results
  assert np.isfinite(results["delta_m"])
  assert 0 <= results["semseg/miou"] <= 100
  assert (workdir / "metrics.md").exists()
  assert checkpoints.committed_steps(workdir / "checkpoints") == [6, 9, 12]  # keep 3 (of 3..12)
  assert len(list((workdir / "predictions").glob("example_*.png"))) == config.num_eval_images
  assert _read_json(workdir / "config.json")["model"]["task_channels"] == 8
  assert "backbone/conv1/kernel" in (workdir / "parameters.txt").read_text()
  assert "on 2 CPU device(s)" in printed and "parameters (" in printed


def test_best_and_last_evaluations_are_both_reported(finished_run, capsys):
  _, workdir, results, printed = finished_run
  record = evaluations.Evaluations(workdir)
  assert record.steps == EVAL_STEPS
  best = record.best_step()
  deltas = {s: record[s]["delta_m"] for s in record.steps}
  assert deltas[best] == max(deltas.values()) and best == min(
      s for s in record.steps if deltas[s] == deltas[best])  # the earliest of ties
  assert _read_json(workdir / "metrics.json") == record[STEPS] == results
  assert _read_json(workdir / "metrics_best.json") == record[best]
  assert checkpoints.committed_steps(workdir / "best") == [best]
  table = (workdir / "metrics.md").read_text()
  assert f"| metric | last (step {STEPS}) | best (step {best}) |" in table
  assert table in printed + "\n"
  # The comparison table takes the best evaluation unless told otherwise, and says which.
  for which, path in (("best", "metrics_best.json"), ("last", "metrics.json")):
    assert compare.main([str(workdir), "--no-cost", "--checkpoint", which,
                         "--out", str(workdir / f"table_{which}.md")]) == 0
    out = capsys.readouterr().out
    assert f"each run's {which} evaluation" in out and path in out
    rmse = _read_json(workdir / path)["depth/rmse"]
    assert f"| {rmse:.4f} |" in out


def _final_params(workdir, config, which="latest"):
  variables, step = inference.restore_variables(workdir, config, which)
  return jax.tree.map(np.asarray, variables), step


def assert_same_run(workdir, reference, config, metric_rtol=0.0):
  """The same final and best parameters (bit for bit) and the same evaluations (to metric_rtol:
  0 = bit for bit)."""
  for which in ("latest", "best"):
    got, step = _final_params(workdir, config, which)
    want, ref_step = _final_params(reference, config, which)
    assert step == ref_step
    jax.tree.map(np.testing.assert_array_equal, got, want)
  for name in (evaluations.EVALUATIONS_FILE, evaluations.LAST_FILE, evaluations.BEST_FILE):
    got, want = _read_json(workdir / name), _read_json(reference / name)
    if name == evaluations.EVALUATIONS_FILE:
      got = {e["step"]: e["metrics"] for e in got["evaluations"]}
      want = {e["step"]: e["metrics"] for e in want["evaluations"]}
    else:
      got, want = {0: got}, {0: want}
    assert got.keys() == want.keys(), name
    assert all(got[step].keys() == want[step].keys() for step in want), name
    differ = {(step, key): (got[step][key], value) for step in want
              for key, value in want[step].items()
              if not (got[step][key] == value
                      or np.isclose(got[step][key], value, rtol=metric_rtol, atol=0))}
    assert not differ, (name, differ)


def test_killed_run_resumes_mid_epoch_exactly(finished_run, tmp_path, data_dir, monkeypatch):
  config, reference, *_ = finished_run
  calls = {"n": 0}
  real_shard = train.shard_batch

  def dies_at_step_5(batch, sharding):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("simulated kill")
    return real_shard(batch, sharding)

  monkeypatch.setattr(train, "shard_batch", dies_at_step_5)
  closed = []
  real_close = checkpoints.RunCheckpoints.close

  def close(self):
    closed.append(True)
    real_close(self)

  monkeypatch.setattr(checkpoints.RunCheckpoints, "close", close)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(train, "shard_batch", real_shard)
  # Saves are written in the background: the stopped run waited for its last one.
  assert closed == [True]
  # Step 3 ends the first batch of the second epoch (2 steps per epoch).
  assert checkpoints.committed_steps(tmp_path / "checkpoints") == [3]

  # Resumes from step 3, restoring into the state's structure: nothing is initialised.
  monkeypatch.setattr(train, "create_train_state", _must_not_initialise)
  train.train_and_evaluate(config, str(tmp_path))
  assert_same_run(tmp_path, reference, config)


def test_a_new_run_compiles_its_train_step_once_while_it_initialises(finished_run, tmp_path,
                                                                     caplog):
  """A new run compiles its train step on a thread of its own while the main thread compiles
  and runs the initialisation, and the loop runs that executable: the step is lowered once
  (not again at the first step), its compile starts before the initialisation's has ended,
  and the run is the uninterrupted run of the fixture, bit for bit."""
  config, reference, *_ = finished_run
  jax.config.update("jax_log_compiles", True)  # a global flag: the compile thread sees it
  try:
    with caplog.at_level(logging.WARNING), contextlib.redirect_stdout(io.StringIO()):
      train.train_and_evaluate(config, str(tmp_path))
  finally:
    jax.config.update("jax_log_compiles", False)
  logged = [(r.threadName, r.getMessage(), r.created) for r in caplog.records]

  def events(text):
    return [(thread, created) for thread, message, created in logged if text in message]

  step_lowered = events("Compiling jit(train_step) ")
  init_done = events("compilation of jit(init) ")
  assert len(step_lowered) == 1, [m[:80] for _, m, _ in logged]
  assert len(init_done) == 1, [m[:80] for _, m, _ in logged]
  (step_thread, step_start), (init_thread, init_end) = step_lowered[0], init_done[0]
  assert step_thread.startswith("compile") and init_thread == "MainThread"
  assert step_start < init_end
  assert_same_run(tmp_path, reference, config)


def test_a_process_that_fails_while_a_step_compiles_exits_once_it_is_compiled(tmp_path):
  """An exception in the main thread while compile_in_background's thread is in XLA: the
  process waits for the compile and exits with the exception's status. (On a daemon thread the
  interpreter aborted at exit: "FATAL: exception not rethrown", status -6.)"""
  script = tmp_path / "fails.py"
  script.write_text(textwrap.dedent("""
      import logging
      import jax, jax.numpy as jnp
      from iterfuse_jax import train
      logging.basicConfig(level=logging.INFO, format="%(message)s")

      def slow_to_compile(x):
        for i in range(120):
          x = jnp.tanh(x @ x.T) + jnp.sin(x * i)
        return x

      train.compile_in_background(jax.jit(slow_to_compile),
                                  jax.ShapeDtypeStruct((32, 32), jnp.float32), name="it")
      raise SystemExit("failed while it compiles")
      """))
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  assert result.returncode == 1, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert "FATAL" not in result.stderr
  failed = lines.index("failed while it compiles")
  compiled = [i for i, line in enumerate(lines) if line.startswith("Compiled it in ")]
  assert compiled and compiled[0] > failed, lines


def test_an_out_of_memory_error_of_the_step_compiled_at_the_start_names_the_streamed_option(
    tmp_path, data_dir, monkeypatch):
  """XLA can refuse the step's memory as it compiles, now on the compile thread of a new run's
  start (on a GPU the temporary buffers are sized then): the error names the streamed IFB."""

  def refused(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 94371840000 bytes.")

  monkeypatch.setattr(train, "initialise_while_compiling", refused)
  with pytest.raises(out_of_memory.IFBOutOfMemoryError, match=r"ifb_impl=streamed"):
    train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))


def _must_not_initialise(*args, **kwargs):
  raise AssertionError("a train state was initialised where a checkpoint is restored")


@pytest.mark.slow
def test_the_initialisation_compiled_for_speed_gives_the_default_bits(data_dir):
  """create_train_state compiles the initialisation at LLVM optimisation level 1
  (train.INIT_COMPILER_OPTIONS) to shorten its compile: the demo network's initial state is the
  one XLA's defaults give, bit for bit, and abstract_train_state describes it exactly."""
  config = tiny_config(data_dir)
  model = train.build_model(config)
  tx = train.create_optimizer(config, train.create_learning_rate_schedule(config, 2))
  mesh = train.create_mesh(1)
  shape = (1, *SIZE, 3)
  state = train.create_train_state(config, model, tx, jax.random.key(3), shape, mesh)
  init = train._initializer(config, model, tx, shape)  # pylint: disable=protected-access
  default = jax.jit(init)(jax.random.key(3))  # XLA's default compiler options
  leaves, default_leaves = jax.tree.leaves(state), jax.tree.leaves(default)
  assert len(leaves) == len(default_leaves) > 500
  for got, want in zip(leaves, default_leaves):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  abstract = train.abstract_train_state(config, model, tx, shape, mesh)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert all((a.shape, a.dtype, a.sharding) == (s.shape, s.dtype, s.sharding)
             for a, s in zip(jax.tree.leaves(abstract), leaves))


def test_a_deterministic_run_compiles_every_jit_with_the_options(finished_run, tmp_path,
                                                                 monkeypatch):
  """config.deterministic: every function that the run, its evaluation and its predictor jit
  gets XLA's deterministic GPU options; on a CPU, deterministic anyway, the run is the same bit
  for bit."""
  config, reference, *_ = finished_run
  config = ml_collections.ConfigDict(config.to_dict())
  config.deterministic = True
  real_jit = jax.jit
  calls = []

  def recording_jit(fun, *args, **kwargs):
    caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
    if caller.startswith("iterfuse_jax."):
      calls.append((caller, repr(fun)[:80], kwargs.get("compiler_options")))
    return real_jit(fun, *args, **kwargs)

  monkeypatch.setattr(jax, "jit", recording_jit)
  with contextlib.redirect_stdout(io.StringIO()):
    train.train_and_evaluate(config, str(tmp_path))
    train.evaluate_checkpoint(config, str(tmp_path), which="best")
  predictor = inference.load_predictor(tmp_path)
  predictor.predict(np.zeros((20, 30, 3), np.uint8))
  monkeypatch.undo()

  # Initialisation, train step, evaluation and prediction; evaluation and prediction again
  # (--mode eval restores without initialising); the predictor's forward.
  callers = [caller for caller, *_ in calls]
  assert callers.count("iterfuse_jax.train") >= 6 and "iterfuse_jax.inference" in callers, calls
  deterministic = determinism.DETERMINISTIC_GPU_OPTIONS.items()
  without = [c for c in calls if not deterministic <= (c[2] or {}).items()]
  assert not without, without
  # The initialisation also compiles for speed (same bits: the test above).
  assert [c[2] for c in calls if "_initializer" in c[1]] == [
      {**determinism.DETERMINISTIC_GPU_OPTIONS, **train.INIT_COMPILER_OPTIONS}], calls
  assert_same_run(tmp_path, reference, config)


def test_unreadable_or_incomplete_latest_checkpoint_is_skipped(finished_run, tmp_path, caplog):
  config, reference, *_ = finished_run
  # The workdir of a run killed after its step-9 save (and evaluations up to step 8).
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")
  record = _read_json(workdir / evaluations.EVALUATIONS_FILE)
  record["evaluations"] = [e for e in record["evaluations"] if e["step"] <= 8]
  (workdir / evaluations.EVALUATIONS_FILE).write_text(json.dumps(record))
  # ... whose step-9 checkpoint is damaged and a save of step 12 was cut short.
  for chunk in (workdir / "checkpoints" / "9" / "state").glob("ocdbt.process_0/d/*"):
    chunk.write_bytes(chunk.read_bytes()[:10])
  incomplete = workdir / "checkpoints" / f"12{checkpoints.INCOMPLETE_MARK}"
  shutil.copytree(reference / "checkpoints" / "12" / "data_iter", incomplete / "data_iter")

  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, str(workdir))
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert f"Skipping the incomplete checkpoint {incomplete}" in warnings
  assert f"Skipping the checkpoint {workdir / 'checkpoints' / '9'}: it cannot be read" in warnings
  assert (workdir / checkpoints.UNREADABLE_DIR / "checkpoints_9").is_dir()
  assert_same_run(workdir, reference, config)  # resumed from step 6


def _remove_prediction_files(workdir: pathlib.Path) -> None:
  """Removes the prediction files another test of the shared run may have written."""
  for task in TINY.dataset.tasks:
    shutil.rmtree(workdir / prediction_files.WORKDIR_SUBDIR / task, ignore_errors=True)


def test_eval_mode_reproduces_the_last_and_the_best_evaluation(finished_run, data_dir,
                                                                monkeypatch):
  config, workdir, *_ = finished_run
  with monkeypatch.context() as patch:
    patch.setattr(train, "create_train_state", _must_not_initialise)
    again = train.evaluate_checkpoint(config, str(workdir), which="latest")
  for key, value in _read_json(workdir / "metrics.json").items():
    np.testing.assert_allclose(again[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
  # As a user asks for it, with the library logs on the console (-v), and the prediction files.
  _remove_prediction_files(workdir)
  result = launch(*tiny_flags(data_dir, workdir), "--mode=eval", "--checkpoint=best", "-v", "0",
                  "--save_predictions")
  assert result.returncode == 0, result.stderr
  best = evaluations.Evaluations(workdir).best_step()
  assert f"best checkpoint (step {best}) of {workdir}" in result.stdout
  best_metrics = _read_json(workdir / "metrics_best.json")
  assert f"| depth/rmse | {best_metrics['depth/rmse']:.4f} |" in result.stdout
  assert "launch.py" in result.stderr and any(
      line[:1] == "I" for line in result.stderr.splitlines())  # -v: INFO logs shown

  # One file per task and validation image, in the survey's formats; scored from the files (the
  # CLI a user runs on them, or on the PyTorch survey code's save_dir), the metrics are the
  # evaluation's own.
  predictions = workdir / "predictions"
  assert f"Predictions of the best checkpoint: {predictions}/<task>/" in result.stdout
  num_val = config.synthetic_data.num_val
  assert len(list((predictions / "semseg").glob("*.png"))) == num_val
  assert len(list((predictions / "depth").glob("*.mat"))) == num_val
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert prediction_files.main([str(workdir)]) == 0
  rescored = json.loads(printed.getvalue())
  for key in ("semseg/miou", "semseg/pixel_acc", "depth/rmse", "depth/log_rmse", "delta_m"):
    np.testing.assert_allclose(rescored[key], best_metrics[key], rtol=1e-5, err_msg=key)


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
  # Summation order differs between 1 and 2 devices: float noise of ~1e-3 relative on the
  # updates, ~5e-5 absolute on these parameters.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4), *new_params)


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
  assert checkpoints.committed_steps(tmp_path / "checkpoints") == [2]
  variables, _ = inference.restore_variables(tmp_path, config)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_eval_schedule():
  # The demo: every 80 steps and the last 3 of 30 epochs of 8 steps.
  assert train.eval_schedule(240, 8, 80, 3) == [80, 160, 224, 232, 240]
  assert train.eval_schedule(12, 2, 0, 3) == EVAL_STEPS
  assert train.eval_schedule(10, 4, -1, 0) == [4, 8, 10]  # -1: every epoch, and the last step
  assert train.eval_schedule(10, 4, 0, 0) == [10]
  assert train.eval_schedule(10, 4, 0, 100) == [4, 8, 10]
  with pytest.raises(ValueError, match="eval_every_steps"):
    train.eval_schedule(10, 4, -2, 0)


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
  tiny = _parse([f"--config={REPO_ROOT}/configs/demo.py:tiny"])
  assert (tiny.model.task_channels, tiny.model.backbone) == (8, "w18_tiny")


def test_paper_settings_of_the_nyud_config():
  config = nyud_ifbC.get_config()
  assert config.model.backbone == "w18_small_v2"
  assert (config.model.tpim.variant, config.model.tpim.n_iter) == ("C", 18)
  assert config.batch_size == 8 and config.num_epochs == 100
  opt = config.optimizer
  assert (opt.name, opt.learning_rate, opt.weight_decay, opt.poly_power) == ("adam", 1e-4, 1e-4, 0.9)
  # The survey code's evaluation: the last 10 epochs, best reported; no periodic evaluation.
  assert (config.eval_last_epochs, config.eval_every_steps) == (10, 0)


def test_poly_schedule_steps_per_epoch():
  config = ml_collections.ConfigDict(nyud_ifbC.get_config().to_dict())
  schedule = train.create_learning_rate_schedule(config, epoch_steps=10)
  lr = [float(schedule(s)) for s in (0, 9, 10, 19, 20, 999)]
  assert lr[0] == lr[1] == pytest.approx(1e-4)
  assert lr[2] == lr[3] == pytest.approx(1e-4 * (1 - 1 / 100) ** 0.9)
  assert lr[4] == pytest.approx(1e-4 * (1 - 2 / 100) ** 0.9)
  assert lr[5] == pytest.approx(1e-4 * (1 - 99 / 100) ** 0.9)


def test_poly_schedule_spans_num_train_steps_and_stays_finite_to_the_end():
  # num_train_steps overrides num_epochs for the decay too: 16 steps of 2 per epoch decay over
  # 8 epochs, not the config's 6 (past which the rate would be 0, or NaN compiled).
  config = tiny_config("", num_train_steps=16)
  schedule = jax.jit(train.create_learning_rate_schedule(config, epoch_steps=2))
  lr = np.array([schedule(jnp.int32(s)) for s in range(17)])
  assert np.isfinite(lr).all(), lr
  base = config.optimizer.learning_rate
  np.testing.assert_allclose(lr[15], base * (1 / 8) ** 0.9, rtol=1e-5)
  assert (np.diff(lr[:16]) <= 0).all() and lr[15] > 0
  # Without the override: num_epochs; compiled, the step after the last is 0, not NaN (optax's
  # polynomial_schedule gives NaN there).
  config = tiny_config("")
  schedule = jax.jit(train.create_learning_rate_schedule(config, epoch_steps=2))
  assert float(schedule(jnp.int32(11))) == pytest.approx(base * (1 / 6) ** 0.9, rel=1e-5)
  assert float(schedule(jnp.int32(12))) == 0.0


def test_a_config_of_another_experiment_is_refused_in_a_workdir_with_checkpoints(tmp_path):
  config = tiny_config(str(tmp_path / "data"))
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  check = functools.partial(train.check_continues_run, workdir=epath.Path(tmp_path),
                            has_checkpoints=True)
  # The same experiment, longer, evaluated or run differently, its data moved: continues.
  check(tiny_config("/elsewhere", num_epochs=9, eval_every_steps=1, **{
      "model.dtype": "bfloat16", "model.tpim.ifb_impl": "streamed", "num_devices": 1}))
  with pytest.raises(train.WorkdirError) as refused:
    check(tiny_config(str(tmp_path / "data"), **{"model.task_channels": 16,
                                                 "optimizer.learning_rate": 1e-3}))
  message = str(refused.value)
  assert str(tmp_path / "config.json") in message
  assert "model.task_channels: 8 -> 16" in message
  assert f"optimizer.learning_rate: {config.optimizer.learning_rate} -> 0.001" in message
  assert "another --workdir" in message
  # Without checkpoints (a run killed before its first save) there is nothing to continue.
  train.check_continues_run(tiny_config("", **{"model.task_channels": 16}),
                            epath.Path(tmp_path), has_checkpoints=False)


def test_launch_of_another_experiment_on_a_finished_workdir_is_refused_and_changes_nothing(
    finished_run, data_dir, tmp_path):
  _, workdir, *_ = finished_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  # log.txt grows with every command; everything else must stay as it was.
  before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name != "log.txt"}
  for mode in ("train", "eval"):
    result = launch(*tiny_flags(data_dir, copy), f"--mode={mode}",
                    "--config.model.task_channels=16")
    _assert_quiet_error(result, "another experiment", "model.task_channels: 8 -> 16")
    assert len(result.stderr.splitlines()) < 10, result.stderr
  after = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name in before}
  assert after == before  # config.json, the metrics and the record


def test_images_per_second_leaves_out_compiling_and_evaluating(tmp_path, data_dir, monkeypatch):
  pause_s = 20.0
  evaluate = train.evaluate

  def slow_evaluate(*args, **kwargs):
    time.sleep(pause_s)
    return evaluate(*args, **kwargs)

  monkeypatch.setattr(train, "evaluate", slow_evaluate)
  # Evaluations after steps 10 (the last whole epoch) and 11 (the last step): the log of step 11
  # times it across the first.
  config = tiny_config(data_dir, log_every_steps=1, eval_last_epochs=1, num_train_steps=11)
  assert train.eval_schedule(11, 2, 0, 1) == [10, 11]
  with contextlib.redirect_stdout(io.StringIO()):
    train.train_and_evaluate(config, str(tmp_path))
  speeds = {step: v for tag, _, step, v in tensorboard_events.read(tmp_path)
            if tag == "images_per_second"}
  # A step of 4 tiny images takes well under a second on a loaded CPU; the first interval holds
  # the compilation (seconds), the last one the 20 s evaluation of step 10.
  floor = config.batch_size / (pause_s / 2)
  assert speeds[1] > floor and speeds[11] > floor, speeds


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


# ----------------------------------------------------------------------------- launch.py


def _assert_quiet_error(result, *needles):
  assert result.returncode == 1, (result.stdout, result.stderr)
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: "), result.stderr
  for needle in needles:
    assert needle in last_line, (needle, result.stderr)
  assert "Traceback" not in result.stderr


def test_launch_without_dataset_exits_with_the_message(tmp_path):
  result = launch(f"--config={REPO_ROOT}/configs/nyud_ifbC.py", f"--workdir={tmp_path}",
                  f"--config.dataset.data_dir={tmp_path}/NYUD_MT")
  _assert_quiet_error(result, f"{tmp_path}/NYUD_MT")


def test_save_predictions_outside_eval_mode_is_refused(tmp_path, data_dir):
  result = launch(*tiny_flags(data_dir, tmp_path), "--save_predictions")
  _assert_quiet_error(result, "--save_predictions", "--mode=eval")
  assert not list(tmp_path.iterdir())  # refused before anything was written


def test_launch_eval_without_checkpoint_exits_with_the_message(tmp_path, data_dir):
  result = launch(*tiny_flags(data_dir, tmp_path / "empty"), "--mode=eval", "--checkpoint=best")
  _assert_quiet_error(result, "no best checkpoint", str(tmp_path / "empty" / "best"))


def test_launch_of_a_diverging_run_exits_with_the_message(tmp_path, data_dir):
  result = launch(*tiny_flags(data_dir, tmp_path), "--config.optimizer.learning_rate=1e6")
  _assert_quiet_error(result, "non-finite loss or gradient at step", "learning_rate")


def test_launch_with_a_misspelt_key_or_a_refused_value_exits_with_the_message(tmp_path, data_dir):
  result = launch(*tiny_flags(data_dir, tmp_path), "--config.batchsize=4")
  _assert_quiet_error(result, "--config: 'batchsize'", 'Did you mean "batch_size"')
  result = launch(*tiny_flags(data_dir, tmp_path), "--config.model.tpim.variant=D")
  _assert_quiet_error(result, "unknown IFB variant 'D'", str(tmp_path / "log.txt"))


def test_a_bad_model_option_fails_before_any_data_is_written(tmp_path):
  """Before: the synthetic data were written (a real dataset's copy prepared, minutes for
  PASCAL-Context) and only then was the model built and the option refused."""
  config = tiny_config("", **{"model.tpim.variant": "D", "synthetic_data.enabled": True})
  with pytest.raises(ValueError, match="unknown IFB variant 'D'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "data").exists()


@pytest.mark.parametrize("config, message", [
    ("configs/nyud_ifbc.py",
     f"error: --config: no config file configs/nyud_ifbc.py (from {REPO_ROOT}); "
     "did you mean configs/nyud_ifbC.py?"),
    ("configs/nyud_ifbD.py",
     f"error: --config: no config file configs/nyud_ifbD.py (from {REPO_ROOT}); "
     "did you mean configs/nyud_ifbA.py or configs/nyud_ifbB.py or configs/nyud_ifbC.py?"),
    ("configs/nothing_like_it.py",
     f"error: --config: no config file configs/nothing_like_it.py (from {REPO_ROOT})"),
    ("configs/demo.py:huge",
     "error: --config: configs/demo.py: unknown variant 'huge'; expected '' or 'tiny'"),
])
def test_launch_with_a_config_file_or_row_that_does_not_exist_says_so_in_one_line(
    config, message, tmp_path):
  """Before: a misspelt file gave a 30-line traceback after creating the workdir, an unknown row
  absl's FATAL report with the config's traceback inside."""
  result = launch(f"--config={config}", f"--workdir={tmp_path / 'work'}")
  assert result.returncode == 1
  assert result.stderr.strip() == message, result.stderr
  assert not (tmp_path / "work").exists()


def test_launch_with_an_unwritable_workdir_names_it(tmp_path, data_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = launch(*tiny_flags(data_dir, blocker / "work"))
  _assert_quiet_error(result, f"cannot write to the workdir {blocker / 'work'}",
                      "Not a directory")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_launch_on_a_full_disk_names_the_workdir(tmp_path, data_dir):
  # /dev/full fails every write with ENOSPC, as a full disk does.
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "parameters.txt").symlink_to("/dev/full")
  result = launch(*tiny_flags(data_dir, workdir))
  _assert_quiet_error(result, "No space left on device", str(workdir))


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(finished_run, tmp_path):
  """2 JAX processes on localhost (one CPU device each, gloo collectives) from an empty workdir:
  process 0 writes and prepares the synthetic data while process 1 waits; the result is that of
  one process with 2 devices on the same global batches."""
  config, reference, *_ = finished_run
  workdir = tmp_path / "two_processes"
  flags = ["--config=configs/demo.py:tiny", f"--workdir={workdir}"]
  start = time.monotonic()
  processes = multiprocess.start(multiprocess.launch_commands([flags] * 2))
  outputs = multiprocess.finish(processes, timeout=1200)
  print(f"two processes: {time.monotonic() - start:.0f} s")
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, (out, err)
  assert "on 2 CPU device(s) in 2 processes" in outputs[0][0]
  assert "Training" not in outputs[1][0]  # process 1 prints nothing of its own
  assert (workdir / "data" / "NYUD_MT_synthetic").is_dir()
  assert (workdir / "log.process1.txt").exists()
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1  # TensorBoard written once
  # The data came from another folder (same files), so compare without config.json.
  # Metrics are float32 sums over the split: the reduction across hosts rounds them up to 1 ulp
  # apart from the one-process reduction (depth/rmse 2.7526862 vs 2.7526860), parameters are equal.
  assert_same_run(workdir, reference, config, metric_rtol=1e-6)


def _two_process_eval(data_dir, workdirs, *extra) -> tuple[list, list[tuple[str, str]]]:
  """`launch.py --mode=eval` of the tiny run in 2 processes, process i on `workdirs[i]`."""
  processes = multiprocess.start(multiprocess.launch_commands(
      [[*tiny_flags(data_dir, workdir), "--mode=eval", *extra] for workdir in workdirs]))
  return processes, multiprocess.finish(processes, timeout=600)


def test_two_processes_evaluate_a_checkpoint_like_one_process(finished_run, data_dir, tmp_path):
  """`--mode eval` in 2 processes on a dataset copy not prepared yet: process 0 prepares it while
  process 1 waits, and the metrics are the run's own (one process, 2 devices)."""
  _, workdir, *_ = finished_run
  prepared = tmp_path / "prepared"
  _remove_prediction_files(workdir)
  processes, outputs = _two_process_eval(data_dir, [workdir, workdir],
                                         f"--config.dataset.prepared_dir={prepared}",
                                         "--save_predictions")
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  # Each process wrote the files of its share of the images: together, all of them.
  for task, suffix in (("semseg", "png"), ("depth", "mat")):
    written = list((workdir / "predictions" / task).glob(f"*.{suffix}"))
    assert len(written) == TINY.synthetic_data.num_val, (task, written)
  step = max(checkpoints.committed_steps(workdir / "checkpoints"))
  assert f"latest checkpoint (step {step}) of {workdir}" in outputs[0][0]
  assert "checkpoint" not in outputs[1][0]  # the table is process 0's alone
  assert (prepared / "nyud_v2_mt").is_dir()  # prepared there, once
  for key, value in _read_json(workdir / "metrics.json").items():
    assert f"| {key} | {value:.4f} |" in outputs[0][0], key


# One Python session per process calling the library several times, as a notebook or a sweep
# script on a cluster does: argv = initialize's three arguments, workdir, data folder.
_SESSION = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
from configs import demo
from iterfuse_jax import train
workdir, config = sys.argv[4], demo.get_config("tiny")
config.dataset.data_dir, config.synthetic_data.enabled = sys.argv[5], False
results = [train.train_and_evaluate(config, workdir),
           train.evaluate_checkpoint(config, workdir, which="latest"),
           train.evaluate_checkpoint(config, workdir, which="best"),
           train.train_and_evaluate(config, workdir)]
print("RESULTS " + json.dumps(results))
"""


def test_processes_call_the_library_again_and_again_in_one_session(finished_run, data_dir,
                                                                   tmp_path):
  """2 processes each call train_and_evaluate, evaluate_checkpoint twice and train_and_evaluate
  again in one Python session: every call compares the processes' workdirs and checkpoints
  again (a name gathered through the coordination service a second time was refused: "key
  iterfuse_jax/checkpoint_listing/0 already exists") and gives the run's metrics."""
  _, reference, *_ = finished_run
  workdir = tmp_path / "session"
  shutil.copytree(reference, workdir)
  processes = multiprocess.start(multiprocess.script_commands(_SESSION, 2, str(workdir), data_dir))
  outputs = multiprocess.finish(processes, timeout=600)
  last, best = _read_json(workdir / "metrics.json"), _read_json(workdir / "metrics_best.json")
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
    finished, latest, best_again, finished_again = json.loads(out.split("RESULTS ")[-1])
    assert finished == finished_again == last  # a finished run: reported, not trained again
    for key in last:
      np.testing.assert_allclose(latest[key], last[key], rtol=1e-4, atol=1e-6, err_msg=key)
      np.testing.assert_allclose(best_again[key], best[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_processes_that_see_different_checkpoints_refuse_to_evaluate(finished_run, data_dir,
                                                                       tmp_path):
  """A workdir that is not the same for every process (here process 1's copy lacks the newest
  checkpoint, as on a host whose network filesystem lags behind) would restore different states
  in different processes: both processes stop, each printing every process's listing (the
  whole message, also where the other process failed first and this one only relays it)."""
  _, reference, *_ = finished_run
  steps = checkpoints.committed_steps(reference / "checkpoints")
  workdirs = [tmp_path / "host0", tmp_path / "host1"]
  for workdir in workdirs:
    shutil.copytree(reference, workdir)
  shutil.rmtree(workdirs[1] / "checkpoints" / str(steps[-1]))
  processes, outputs = _two_process_eval(data_dir, workdirs)
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 1, err[-3000:]
    assert "the processes see different checkpoints" in err, err[-3000:]
    assert f"process 0 on {socket.gethostname()}: {workdirs[0]}: checkpoints/ steps {steps}" in err
    assert f"process 1 on {socket.gethostname()}: {workdirs[1]}: checkpoints/ steps {steps[:-1]}" \
        in err
    # One error each (the same, found at once; not also relayed from the other), and no abort
    # of process 1 by the coordination service that went with process 0.
    assert err.count("give every process the same workdir") == 1, err[-3000:]
    assert "Traceback" not in err and "Terminating process" not in err


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_same_command_finishes_the_same_run(
    finished_run, tmp_path):
  """SIGKILL of a real `launch.py` from an empty workdir at seeded random moments (while it
  writes the synthetic data, prepares the dataset, starts, trains, saves a checkpoint, saves the
  best checkpoint), the same command again each time; then the run finishes with exactly the
  uninterrupted run's parameters and metrics."""
  config, reference, *_ = finished_run
  workdir = tmp_path / "killed"
  command = [sys.executable, str(REPO_ROOT / "launch.py"), "--config=configs/demo.py:tiny",
             f"--workdir={workdir}"]
  rng = random.Random(12)
  # (moment, seconds): as soon as the temporary folder of that stage exists, or that long after
  # the start, or after training began (the attempt's TensorBoard file appears).
  plan = [("writing the data", None), ("preparing the dataset", None),
          ("checkpoint save", None), ("start-up", rng.uniform(2, 12)), ("best save", None),
          ("training", rng.uniform(0, 20)), ("checkpoint save", None)]
  stages = {"writing the data": "data/*.incomplete",
            "preparing the dataset": "data/*_tfds/*/*/incomplete*",
            "checkpoint save": f"checkpoints/*{checkpoints.INCOMPLETE_MARK}",
            "best save": f"best/*{checkpoints.INCOMPLETE_MARK}"}
  report = []
  for moment, seconds in plan:
    events_before = len(list(workdir.glob("events.out.tfevents.*")))
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    launched, training = time.monotonic(), None
    while process.poll() is None:
      now = time.monotonic()
      if moment in stages:
        due = bool(glob.glob(str(workdir / stages[moment])))
      elif moment == "start-up":
        due = now - launched >= seconds
      else:
        if training is None and len(list(workdir.glob("events.out.tfevents.*"))) > events_before:
          training = now
        due = training is not None and now - training >= seconds
      if due:
        process.send_signal(signal.SIGKILL)
        break
      time.sleep(0.005)
    returncode = process.wait(timeout=60)
    if returncode == -signal.SIGKILL:
      report.append(f"killed during {moment} {time.monotonic() - launched:.1f} s after the start"
                    f" (then: checkpoints {checkpoints.committed_steps(workdir / 'checkpoints')},"
                    f" evaluations {evaluations.Evaluations(workdir).steps})")
    else:
      assert returncode == 0
      report.append(f"finished before the kill planned during {moment}")
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
  print("\n".join(report))
  assert result.returncode == 0, result.stderr
  assert "Traceback" not in result.stderr
  assert sum(r.startswith("killed") for r in report) >= 4, report
  assert_same_run(workdir, reference, config)

  # The same command on the finished workdir: the final metrics, nothing trained, no traceback.
  again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  assert f"{workdir} holds the finished run" in again.stdout
  assert (workdir / "metrics.md").read_text() in again.stdout + "\n"
  assert "Traceback" not in again.stderr and "train" not in again.stderr


def test_console_of_a_run_is_short_and_says_where_things_are(finished_run, data_dir, tmp_path):
  """What `launch.py` prints: what is trained and where, progress, one line per evaluation, the
  metrics table and where the results are; no library logs."""
  import re
  result = launch(*tiny_flags(data_dir, tmp_path))
  assert result.returncode == 0, result.stderr
  out, err = result.stdout, result.stderr
  print(out, err)
  lines = out.splitlines() + err.splitlines()
  assert len(lines) < 40, lines
  assert not [line for line in lines if re.match(INFO_LINE, line)], err
  assert out.splitlines()[0].startswith("Training iterfuse on nyud (semseg, depth): 12 steps")
  assert sum(line.startswith("eval @ step") for line in out.splitlines()) == len(EVAL_STEPS)
  assert f"train {STEPS}/{STEPS}" in err and "img/s" in err
  for where in ("Metrics:", "Checkpoints:", "Pictures:", "Logs:"):
    assert any(line.startswith(where) and str(tmp_path) in line for line in out.splitlines())
  log = (tmp_path / "log.txt").read_text()
  assert "orbax" in log.lower() and "Finished saving checkpoint" in log
  # A run launched from the command line is the run of train_and_evaluate.
  assert_same_run(tmp_path, finished_run[1], finished_run[0])


@pytest.mark.slow
def test_a_run_without_tensorflow_writes_the_same_tensorboard_summaries(finished_run, data_dir,
                                                                         tmp_path):
  """On a machine without TensorFlow (the GPU machines' image; many CUDA installs of jax) clu's
  writers cannot be imported. `launch.py` trains there all the same (a copy of this environment
  without TensorFlow, `benchmarks.gpu_image.site_farm`) and writes the summaries clu's writers
  write: the same tags, plugins, steps and values, the same pictures and the hyperparameters."""
  from benchmarks import gpu_image
  config, reference, *_ = finished_run
  # tensorflow-metadata stays: tensorflow-datasets needs it (the GPU machines get it as a wheel).
  hidden = [d for d in gpu_image.TENSORFLOW_DISTRIBUTIONS if d != "tensorflow-metadata"]
  farm = gpu_image.site_farm(tmp_path / "site", gpu_image.hide_predicate(hidden),
                             keep_unowned=True)
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-S", str(REPO_ROOT / "launch.py"),
                           *tiny_flags(data_dir, workdir)],
                          env=gpu_image.farm_env(farm, [str(REPO_ROOT)]), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "No usable TensorFlow" in (workdir / "log.txt").read_text()
  assert_same_run(workdir, reference, config)

  got_images, want_images = {}, {}
  got = tensorboard_events.read(workdir, got_images)
  want = tensorboard_events.read(reference, want_images)
  clu_progress = {"steps_per_sec", "uptime"}  # clu's ReportProgress, a TensorFlow-only hook
  assert (sorted(r[:3] for r in got)
          == sorted(r[:3] for r in want if r[0] not in clu_progress))
  timed = {"images_per_second", "input_fraction"}
  got_values = {(tag, step): v for tag, _, step, v in got if v is not None and tag not in timed}
  want_values = {(tag, step): v for tag, _, step, v in want
                 if v is not None and tag not in timed | clu_progress}
  assert got_values == want_values
  assert {tag for tag, plugin, *_ in got if plugin == "hparams"}, "no hyperparameters written"
  assert got_images.keys() == want_images.keys() and got_images
  for key, picture in want_images.items():
    np.testing.assert_array_equal(got_images[key], picture, err_msg=str(key))
