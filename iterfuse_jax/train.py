"""Training and evaluation: `train_and_evaluate(config, workdir)` and the jitted step functions.

Data parallel over a 1-D device mesh ("data"): the global batch is sharded over all devices of all
hosts, parameters and optimiser state are replicated, and `jax.jit` inserts the collectives, so
BatchNorm statistics and gradients are those of the global batch. The same code runs on 1 device
and on N, in one process or in several (multi-host: each process reads its part of every global
batch; process 0 alone writes the data, the config, metrics, pictures and TensorBoard files, and
the others wait at a barrier until the data it prepares is there).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import parameter_overview  # TensorFlow-free, unlike clu's metric writers
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The step functions, the optimiser and the train state import without TensorFlow, grain or tfds
# (a GPU image has none of them): the data pipeline and the checkpoints (grain's iterator state)
# are imported where the loop uses them, and TensorFlow (clu's writers, `summaries`) only when a
# run starts and only if it is installed.
from data_pipelines import io_utils  # numpy and PIL only
from iterfuse_jax import (boundary_eval, console, coordination, determinism, eval_resizing,
                          evaluations, inference, losses, metrics, out_of_memory,
                          prediction_files, run_identity, stopping, summaries, visualization)
from iterfuse_jax import tasks as task_registry
from iterfuse_jax.models import build, build_model, initialization

PyTree = Any
Batch = Mapping[str, np.ndarray]
# Keys of an eval batch that stay on the host (strings cannot become jax arrays).
HOST_ONLY_KEYS = ("image_id",)
# The offline boundary metric a run with the edge task still owes until it is recorded.
BOUNDARY_KEY = f"{boundary_eval.TASK}/odsF"


class TrainState(train_state.TrainState):
  """Flax train state plus BatchNorm statistics and the non-finite-loss guard.

  `nonfinite_step` is -1 while every loss has been finite; otherwise the (1-based) step of the
  first non-finite loss, after which updates are skipped, so the state stays the last good one.
  """

  batch_stats: PyTree = None
  nonfinite_step: jax.Array = None


class NonFiniteLossError(FloatingPointError):
  pass


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written; the message names it and why."""


# ----------------------------------------------------------------------------- optimiser


def steps_per_epoch(num_train_examples: int, batch_size: int) -> int:
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1 (images per step, over all devices), got "
                     f"{batch_size}")
  if num_train_examples < batch_size:
    raise ValueError(
        f"the training split has {num_train_examples} examples, fewer than one global batch "
        f"of {batch_size}")
  return num_train_examples // batch_size


def total_train_steps(config: ml_collections.ConfigDict, epoch_steps: int) -> int:
  """The run's length: `num_train_steps` when > 0, else `num_epochs` whole epochs."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * epoch_steps


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  epoch_steps: int) -> optax.Schedule:
  """Poly schedule stepped per epoch: lr * (1 - epoch / epochs) ** power.

  `epochs` is `num_epochs`, or the epochs `num_train_steps` starts when that is set (it
  overrides `num_epochs`), so the rate decays over the steps the run takes and never reaches
  zero before the last one.
  """
  opt = config.optimizer
  epochs = -(-total_train_steps(config, epoch_steps) // epoch_steps)

  def schedule(step: jax.Array) -> jax.Array:
    # Written out rather than optax.polynomial_schedule: compiled, its 1 - count / steps comes out
    # a rounding below zero at count == steps, and a negative base to the power 0.9 is NaN.
    remaining = jnp.maximum(1.0 - (step // epoch_steps) / epochs, 0.0)
    return opt.learning_rate * remaining ** opt.poly_power

  return schedule


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (multi-task models) or SGD + momentum (STL), L2 weight decay added to the gradient.

  Adding the decay to the gradient before the moments (not AdamW's decoupled decay) is what
  PyTorch's `Adam(weight_decay=...)` in the reference code does.
  """
  opt = config.optimizer
  if opt.name == "adam":
    update = optax.scale_by_adam()
  elif opt.name == "sgd":
    update = optax.trace(decay=opt.momentum)
  else:
    raise ValueError(f"unknown optimizer.name {opt.name!r}; expected 'adam' or 'sgd'")
  return optax.chain(optax.add_decayed_weights(opt.weight_decay), update,
                     optax.scale_by_learning_rate(schedule))


# ----------------------------------------------------------------------------- steps


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
  """The "dropout" rng of the training step that starts at `step` (0-based).

  A function of the seed and the step alone, not a key carried in the state: a resumed run
  draws the masks an uninterrupted one would, and checkpoints keep their structure. The stream
  is the seed's key folded with 2 (1 is the initialisation's), then with the step.
  """
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)


def train_step(state: TrainState, batch: Batch, *, tasks: tuple[str, ...],
               loss_weights: Mapping[str, float], schedule: optax.Schedule,
               seed: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a (global) batch; returns the new state and scalar metrics.

  `seed` (the run's `config.seed`) makes the dropout masks of models that have dropout
  (`dropout_key`); the others draw nothing.
  """

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_key(seed, state.step)})
    total, parts = losses.multitask_loss(outputs, batch, tasks, loss_weights)
    return total, (parts, updates["batch_stats"])

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(loss) & jax.tree.reduce(
      jnp.logical_and, jax.tree.map(lambda g: jnp.isfinite(g).all(), grads))
  healthy = finite & (state.nonfinite_step < 0)
  # Once a loss is non-finite, freeze the state so that it stays the last good one. A cond, not
  # a per-leaf select of old and new state: the select made XLA's CPU compile ~20x slower.
  new_state = jax.lax.cond(
      healthy, lambda s: s.apply_gradients(grads=grads, batch_stats=batch_stats), lambda s: s,
      state)
  new_state = new_state.replace(nonfinite_step=jnp.where(
      (state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step))
  out = {f"loss/{name}": value for name, value in parts.items()}
  out["learning_rate"] = schedule(state.step)
  return new_state, out


def eval_step(state: TrainState, batch: Batch, *, tasks: tuple[str, ...],
              metrics_cls: type, resize_order: str = "survey") -> Any:
  """Predictions of one eval batch scored at the original image size; returns metric states.

  `resize_order` is how predictions reach the original size (`eval_resizing`): "survey" (decode,
  then resize as the survey code does) or "logits" (resize the logits, then decode).
  """
  outputs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                           batch["image"], train=False)
  canvas = batch[tasks[0]].shape[1:3]
  predictions, decoded = eval_resizing.eval_predictions(
      outputs["final"], batch["original_size"], canvas, tasks, resize_order)
  return metrics_cls.single_from_model_output(
      predictions=predictions, labels={task: batch[task] for task in tasks},
      example_mask=batch["example_mask"], decoded=decoded)


def predict_step(state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
  """Final predictions [B, H, W, C_task] of the model in eval mode."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        images, train=False)["final"]


# ----------------------------------------------------------------------------- setup


def jit_train_step(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   state: TrainState, mesh: Mesh) -> Callable:
  """`train_step` jitted as the training loop runs it: the state (its structure from `state`,
  arrays or ShapeDtypeStructs) replicated on `mesh` and donated, the batch sharded over "data",
  the metrics replicated, the config's compiler options."""
  replicated = NamedSharding(mesh, PartitionSpec())
  state_sharding = jax.tree.map(lambda _: replicated, state)
  return jax.jit(
      functools.partial(train_step, tasks=tuple(config.dataset.tasks),
                        loss_weights=dict(config.loss_weights), schedule=schedule,
                        seed=int(config.seed)),
      in_shardings=(state_sharding, NamedSharding(mesh, PartitionSpec("data"))),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,),
      compiler_options=determinism.compiler_options(config))


def create_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D "data" mesh over the first `num_devices` devices (-1: all, on every host)."""
  devices = jax.devices()
  if num_devices > 0:
    if jax.process_count() > 1:
      raise ValueError("num_devices must be -1 (all devices) in a multi-host run")
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ("data",))


# Compiling the initialisation is mostly LLVM optimising one random-number kernel per parameter
# tensor, for a function that runs once. At optimisation level 1 it compiles faster (on a
# 2-core CPU: the paper's NYUD model 44 -> 31 s, PASCAL-Context with W18 96 -> 82 s, the tiny
# demo's 24 -> 15 s) and gives the same bits (tests/test_train.py; level 0 changes them).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _initializer(config: ml_collections.ConfigDict, model, tx,
                 input_shape: tuple[int, ...]) -> Callable[[jax.Array], TrainState]:
  """rng -> the initial TrainState (parameters, BatchNorm statistics, optimiser state)."""

  def init(rng):
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
    # Outside the backbone, PyTorch's default initialisation where the config asks for it.
    params = initialization.initialize_params(variables["params"], jax.random.fold_in(rng, 1),
                                              config.model.get("init", "flax"))
    return TrainState.create(apply_fn=model.apply, params=params,
                             batch_stats=variables.get("batch_stats", {}), tx=tx,
                             nonfinite_step=jnp.array(-1, jnp.int32))

  return init


def abstract_train_state(config: ml_collections.ConfigDict, model, tx,
                         input_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
  """The train state as shapes, dtypes and replicated shardings, nothing computed or compiled:
  what a checkpoint is restored into (a resumed run, --mode eval).

  input_shape: [1, H, W, 3] of an image the model accepts (the state does not depend on it).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = jax.eval_shape(_initializer(config, model, tx, input_shape), jax.random.key(0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      abstract)


def load_pretrained_backbone(config: ml_collections.ConfigDict) -> PyTree | None:
  """The converted ImageNet backbone `config.model.pretrained` names ({"params", "batch_stats"}),
  or None without one; a wrong folder or variant raises a ValueError naming it."""
  if not config.model.pretrained:
    return None
  from iterfuse_jax import convert_imagenet  # pylint: disable=g-import-not-at-top
  return convert_imagenet.load_backbone_variables(config.model.pretrained, config.model.backbone)


def create_train_state(config: ml_collections.ConfigDict, model, tx, rng: jax.Array,
                       input_shape: tuple[int, ...], mesh: Mesh, *,
                       pretrained: PyTree | None = None) -> TrainState:
  """Initialises parameters, BatchNorm statistics and optimiser state, replicated on `mesh`.

  It compiles and runs the initialisation (not to be traced: abstract_train_state gives the
  state's shapes without computing it). A converted ImageNet backbone (`config.model.pretrained`)
  is read before the initialisation is compiled, so that a wrong folder or variant is reported in
  seconds, not after the compile; `pretrained` is that backbone already read
  (`load_pretrained_backbone`).
  """
  if pretrained is None:
    pretrained = load_pretrained_backbone(config)

  replicated = NamedSharding(mesh, PartitionSpec())
  options = {**(determinism.compiler_options(config) or {}), **INIT_COMPILER_OPTIONS}
  # One sharding for the whole output tree: every leaf replicated.
  state = jax.jit(_initializer(config, model, tx, input_shape), out_shardings=replicated,
                  compiler_options=options)(rng)
  if pretrained is not None:
    state = insert_pretrained_backbone(state, pretrained, config.model.pretrained, replicated)
  return state


def compile_in_background(jitted: Callable, *args: Any,
                          name: str = "the step") -> concurrent.futures.Future:
  """Starts compiling `jitted` for `args` on a thread of its own.

  Args:
    jitted: a `jax.jit` function.
    *args: its arguments, arrays or `jax.ShapeDtypeStruct`s with their shardings.
    name: what it is, for the log.

  Returns:
    A future whose result is the compiled function (`jax.stages.Compiled`; it takes arguments
    of exactly these shapes, dtypes and shardings) or the compile's exception. XLA releases the
    GIL while it compiles, so the caller's own compiles and computations run meanwhile.

  The thread is not a daemon: an interpreter that exits while XLA is compiling on a daemon thread
  aborts ("FATAL: exception not rethrown"), so a process that fails or is interrupted meanwhile
  exits once the compile ends, as it does today when Ctrl-C arrives during a compile.
  """

  def compile_step():
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    logging.info("Compiled %s in %.1f s (in the background)", name,
                 time.perf_counter() - start)
    return compiled

  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="compile")
  try:
    return executor.submit(compile_step)
  finally:
    executor.shutdown(wait=False)  # the thread ends with its one task


def initialise_while_compiling(config: ml_collections.ConfigDict, model, tx, rng: jax.Array,
                               input_shape: tuple[int, ...], mesh: Mesh, jitted_train: Callable,
                               abstract_state: TrainState, batch: Batch, *,
                               pretrained: PyTree | None = None
                               ) -> tuple[TrainState, jax.stages.Compiled]:
  """A new run's train state (create_train_state), and its train step compiled meanwhile.

  The step compiles on another thread while this one compiles and runs the initialisation: two
  independent XLA compiles of about the same length (on an H200, the paper's NYUD model's took
  69 s and 88 s one after the other; on a 2-core CPU the demo's took 29-31 s and 58-59 s, 88-89
  s in all, and 66-74 s at once: benchmarks/startup.py).

  Args:
    jitted_train: the `jax.jit` train step; abstract_state: the state's shapes and shardings
      (abstract_train_state); batch: a batch of the run (arrays or ShapeDtypeStructs, sharded).
    pretrained: as create_train_state's.

  Returns:
    (state, the compiled train step).
  """
  compiling = compile_in_background(jitted_train, abstract_state, batch, name="the train step")
  start = time.perf_counter()
  try:
    state = create_train_state(config, model, tx, rng, input_shape, mesh, pretrained=pretrained)
    jax.block_until_ready(state)
  except BaseException:
    if not compiling.done():
      console.line("(The train step is still compiling on another thread; XLA cannot be "
                   "interrupted, so the process ends when it is done.)")
    raise
  logging.info("Initialised the train state in %.1f s (compiling included)",
               time.perf_counter() - start)
  return state, compiling.result()


def insert_pretrained_backbone(state: TrainState, backbone: PyTree, source: str,
                               sharding: NamedSharding) -> TrainState:
  """Replaces every backbone sub-tree (one per task for STL) by `backbone`.

  Args:
    backbone: {"params": ..., "batch_stats": ...} of `convert_imagenet.load_backbone_variables`.
    source: where it was read from, for the log.

  The optimiser state is initialised again for the new parameters.
  """
  from iterfuse_jax import convert_imagenet  # pylint: disable=g-import-not-at-top

  variables, paths = convert_imagenet.insert_backbones(
      {"params": state.params, "batch_stats": state.batch_stats}, backbone)
  variables = jax.device_put(variables, sharding)
  logging.info("Initialised %s from %s", ", ".join("/".join(p) for p in paths), source)
  # tx.init makes its step counters on the default device: replicated like the rest.
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=jax.device_put(state.tx.init(variables["params"]), sharding))


def prepare_synthetic_data(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Writes the synthetic dataset the config asks for, unless it is already there (process 0).

  The files are written to `<data_dir>.incomplete` and the folder renamed when all are there, so
  a run killed meanwhile writes them again instead of reading half a dataset.
  """
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

  syn = config.synthetic_data
  name = config.dataset.name
  if not config.dataset.data_dir:
    folder = {"nyud": "NYUD_MT_synthetic", "pascal": "PASCAL_MT_synthetic"}[name]
    config.dataset.data_dir = str(workdir / "data" / folder)
  data_dir = epath.Path(config.dataset.data_dir)
  if data_dir.exists() or jax.process_index() > 0:
    return
  writer = {"nyud": synthetic.write_nyud, "pascal": synthetic.write_pascal}[name]
  console.line(f"Writing the synthetic {name} dataset to {data_dir}")
  incomplete = data_dir.parent / (data_dir.name + ".incomplete")
  if incomplete.exists():
    incomplete.rmtree()
  writer(str(incomplete), num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed,
         height=syn.height, width=syn.width)
  incomplete.rename(data_dir)


def check_workdir(workdir: epath.Path) -> None:
  """Creates the workdir and checks that a file can be written there.

  Raises:
    WorkdirError: it cannot (the message names the path and the reason).
  """
  probe = workdir / f".write_test.{os.getpid()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"cannot write to the workdir {workdir}: {e.strerror or e}") from e


SHARED_WORKDIR_MARK = ".process0"


def check_shared_workdir(workdir: epath.Path) -> None:
  """In a run of several processes, checks that every process sees the workdir process 0 writes
  (call it in every process, after process 0's `check_workdir`).

  Otherwise each host would read its own checkpoints (none, or other ones) and the processes
  would start from different states: their collectives pair up wrongly, or wait forever.

  Raises:
    WorkdirError: this process does not see process 0's file in its workdir.
  """
  if jax.process_count() == 1:
    return
  mark = workdir / SHARED_WORKDIR_MARK
  text = ""
  if jax.process_index() == 0:
    text = f"{uuid.uuid4().hex} {socket.gethostname()}:{os.path.abspath(mark)}"
    try:
      mark.write_text(text)
    except OSError as e:
      raise WorkdirError(f"cannot write to the workdir {workdir}: {e.strerror or e}") from e
  # Process 0's text arrives once its file is written; the others give none.
  expected = coordination.gather_texts("workdir_mark", text)[0]
  if jax.process_index() == 0:
    return
  try:
    seen = mark.read_text()
  except OSError:
    seen = None
  if seen != expected:
    raise WorkdirError(
        f"process {jax.process_index()} (on {socket.gethostname()}) does not see in its workdir "
        f"{os.path.abspath(workdir)} the file {SHARED_WORKDIR_MARK} that process 0 wrote at "
        f"{expected.split(' ', 1)[1]}: give every process the same workdir, on a filesystem "
        "every host sees (a relative path is taken from each process's current directory)")


def check_same_checkpoints(workdir: epath.Path) -> dict[str, list[int]]:
  """The committed steps of the workdir's checkpoints/ and best/; in a run of several processes,
  checks that every process lists the same (call it in every process before one is restored).

  Otherwise processes restore different states (a workdir on a host-local disk, a copy of it, a
  network filesystem whose listing lags behind on one host) and go on, silently, with
  replicated parameters that differ, or one of them finds none and fails alone.

  Returns:
    {"checkpoints": steps, "best": steps}, ascending.

  Raises:
    WorkdirError: the processes' listings differ; names each process's host, folder and steps.
  """
  # pylint: disable-next=g-import-not-at-top
  from iterfuse_jax.checkpoints import committed_steps
  listing = {folder: committed_steps(workdir / folder) for folder in ("checkpoints", "best")}
  if jax.process_count() == 1:
    return listing
  views = coordination.gather_texts("checkpoint_listing", json.dumps(
      {"host": socket.gethostname(), "workdir": os.path.abspath(workdir), **listing}))
  views = [json.loads(view) for view in views]
  if all(view["checkpoints"] == listing["checkpoints"] and view["best"] == listing["best"]
         for view in views):
    return listing
  lines = [f"  process {p} on {view['host']}: {view['workdir']}: checkpoints/ steps "
           f"{view['checkpoints'] or 'none'}, best/ steps {view['best'] or 'none'}"
           for p, view in enumerate(views)]
  raise WorkdirError(
      "the processes see different checkpoints in their workdir:\n" + "\n".join(lines) + "\n"
      "give every process the same workdir, on a filesystem every host sees (where a network "
      "filesystem lists new files late on some hosts, run the command again a little later)")


def check_continues_run(config: ml_collections.ConfigDict, workdir: epath.Path,
                        has_checkpoints: bool) -> None:
  """Refuses a config that is another experiment than the run whose checkpoints the workdir
  holds (`iterfuse_jax.run_identity`); lengthening the run or changing how it is evaluated,
  logged or run is the same experiment.

  Raises:
    WorkdirError: naming the workdir and every key that differs, with both values.
  """
  path = workdir / inference.CONFIG_FILE
  if not has_checkpoints or not path.exists():
    return  # a new run, or one killed before its first checkpoint: nothing to continue
  try:
    stored = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirError(f"cannot read {path} ({e}), the config of the run whose checkpoints "
                       f"{workdir} holds; train this config in another workdir") from e
  changed = run_identity.differences(stored, config.to_dict())
  if changed:
    raise WorkdirError(
        f"{workdir} holds the checkpoints of another experiment ({path}); this config changes "
        + "; ".join(changed) + ". Run that experiment's config to continue or evaluate it, or "
        "give this one another --workdir")


def resolve_atrc_genotype(config: ml_collections.ConfigDict) -> None:
  """Replaces an ATRC genotype file's path by its JSON text, in place: config.json keeps the
  genotype itself, not the path of the file it was read from."""
  if config.model.name == "atrc" and "atrc" in config.model:
    config.model.atrc.genotype = json.dumps(
        build.load_atrc_genotype(config.model.atrc.genotype, tuple(config.dataset.tasks)),
        sort_keys=True)


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
  """Process 0 runs the block first (one-time work: writing or preparing data); the others wait
  at a barrier and run it after (then only reading what process 0 made)."""
  multi = jax.process_count() > 1
  if multi and jax.process_index() > 0:
    multihost_utils.sync_global_devices(name)
  yield
  if multi and jax.process_index() == 0:
    multihost_utils.sync_global_devices(name)


def shard_batch(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
  """Turns this host's part of a global batch into global arrays sharded over "data"."""
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in batch.items() if key not in HOST_ONLY_KEYS
  }


def host_rows(tree: Any) -> Any:
  """This host's rows of arrays sharded over "data", as numpy: those of its `shard_batch` input,
  in their order (the whole arrays in a single process)."""

  def rows(array: jax.Array) -> np.ndarray:
    shards = {shard.index[0].start or 0: shard for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])

  return jax.tree.map(rows, tree)


# ----------------------------------------------------------------------------- evaluation


def evaluate(state: TrainState, jitted_eval: Callable, eval_batches, sharding: NamedSharding,
             num_batches: int | None = None, desc: str = "eval") -> dict[str, float]:
  """Runs the eval steps over all eval batches and returns the computed metrics."""
  merged = None
  with console.progress(total=num_batches, desc=desc, unit="batch", leave=False) as bar:
    for batch in eval_batches:
      update = jitted_eval(state, shard_batch(batch, sharding))
      merged = update if merged is None else merged.merge(update)
      bar.update(1)
  if merged is None:
    raise ValueError("the evaluation split yielded no batch")
  return {name: float(value) for name, value in merged.compute().items()}


def predict_on_host(state: TrainState, jitted_predict: Callable, images: np.ndarray,
                    sharding: NamedSharding) -> dict[str, np.ndarray]:
  """This host's images [B, h, w, 3] -> {task: final outputs [B, h, w, C_task]} as numpy: the
  images sharded over "data", `jitted_predict` (predict_step), and this host's rows back."""
  return host_rows(jitted_predict(state, shard_batch({"image": images}, sharding)["image"]))


def summary_images(state: TrainState, jitted_predict: Callable, batch: Batch,
                   tasks: tuple[str, ...], dataset: str, count: int,
                   sharding: NamedSharding) -> dict[str, np.ndarray]:
  """Input, ground truth and prediction images ([N, H, W, 3] uint8) for the first examples."""
  predictions = predict_on_host(state, jitted_predict, batch["image"], sharding)
  count = min(count, len(batch["image"]))
  h, w = batch["image"].shape[1:3]
  out = {"input": visualization.denormalize_image(np.asarray(batch["image"][:count]))}
  for task in tasks:
    label = np.asarray(batch[task][:count])
    # Eval labels are at the original size inside a padded canvas; show the valid part resized.
    label = np.stack([_resize_nearest(l[:s[0], :s[1]], (h, w))
                      for l, s in zip(label, np.asarray(batch["original_size"][:count]))])
    out[f"{task}/ground_truth"] = visualization.task_to_rgb(task, dataset, label,
                                                            is_prediction=False)
    out[f"{task}/prediction"] = visualization.task_to_rgb(
        task, dataset, np.asarray(predictions[task][:count]), is_prediction=True)
  return out


def _resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  rows = (np.arange(size[0]) * x.shape[0] // size[0]).clip(0, x.shape[0] - 1)
  cols = (np.arange(size[1]) * x.shape[1] // size[1]).clip(0, x.shape[1] - 1)
  return x[rows][:, cols]


def results_table(results: Mapping[str, float], title: str) -> str:
  """A Markdown table of metric name and value."""
  lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
  lines += [f"| {name} | {value:.4f} |" for name, value in sorted(results.items())]
  return "\n".join(lines)


def add_delta_m(results: dict[str, float], config: ml_collections.ConfigDict,
                tasks: tuple[str, ...]) -> dict[str, float]:
  # Edge odsF exists only after the boundary evaluation, and normals/edge have no paper STL
  # reference: until then Delta_m averages over the tasks it can score ("delta_m_tasks" of them).
  value, used = metrics.available_delta_m(results, dict(config.stl_references), tasks)
  if len(used) < len(tasks):
    logging.info("Delta_m over %s only (%s: offline metric pending or no STL reference)",
                 ",".join(used), ",".join(t for t in tasks if t not in used))
  results["delta_m"] = value
  results["delta_m_tasks"] = float(len(used))
  return results


def boundary_metrics(config: ml_collections.ConfigDict, workdir: epath.Path, state: TrainState,
                     jitted_predict: Callable, sharding: NamedSharding,
                     written: bool = False) -> dict[str, float]:
  """Edge odsF over the saved predictions of the eval split (`boundary_eval`); {} without edge.

  written: the edge files are there already (`write_prediction_files`); only score them.
  """

  def predict(images: np.ndarray) -> np.ndarray:
    return predict_on_host(state, jitted_predict, images, sharding)[boundary_eval.TASK]

  return boundary_eval.run(config, workdir, create_eval_batches(config),
                           None if written else predict)


def write_prediction_files(config: ml_collections.ConfigDict, directory: epath.Path,
                           state: TrainState, jitted_predict: Callable,
                           sharding: NamedSharding) -> int:
  """Writes every task's prediction of every eval image to <directory>/<task>/ in the survey's
  formats (`prediction_files`); each process writes its share, and all wait until every file is
  there. Returns the number of images this process wrote."""
  eval_batches = create_eval_batches(config)
  return prediction_files.save_split(
      eval_batches, lambda images: predict_on_host(state, jitted_predict, images, sharding),
      directory, tuple(config.dataset.tasks), total=len(eval_batches))


def save_prediction_images(images: Mapping[str, np.ndarray], directory: epath.Path) -> None:
  """Writes one PNG strip per example: input, then ground truth / prediction per task."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  directory.mkdir(parents=True, exist_ok=True)
  names = ["input"] + sorted(k for k in images if k != "input")
  for i in range(len(images["input"])):
    strip = np.concatenate([images[name][i] for name in names], axis=1)
    Image.fromarray(strip).save(directory / f"example_{i}.png")
  (directory / "README.txt").write_text("Columns, left to right: " + ", ".join(names) + "\n")


# ----------------------------------------------------------------------------- main loop


def eval_schedule(total_steps: int, epoch_steps: int, every_steps: int,
                  last_epochs: int) -> list[int]:
  """The steps after which a run evaluates.

  Every `every_steps` steps (-1: at the end of every epoch, 0: never), at the end of each of the
  last `last_epochs` epochs, and after the final step.
  """
  if every_steps < -1 or last_epochs < 0:
    raise ValueError(f"eval_every_steps must be >= -1 and eval_last_epochs >= 0, got "
                     f"{every_steps} and {last_epochs}")
  steps = {total_steps}
  every = epoch_steps if every_steps == -1 else every_steps
  if every > 0:
    steps.update(range(every, total_steps + 1, every))
  first = total_steps - last_epochs * epoch_steps
  steps.update(s for s in range(epoch_steps, total_steps + 1, epoch_steps) if s > first)
  return sorted(steps)


def _check_finite(state: TrainState, last_saved: int | None, workdir: epath.Path) -> None:
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    where = (f"the last good checkpoint is step {last_saved} in {workdir / 'checkpoints'}"
             if last_saved is not None else "no checkpoint had been written")
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad}; training stopped ({where}). Lower "
        "optimizer.learning_rate or check the input data.")


def _headline_text(results: Mapping[str, float], tasks: tuple[str, ...]) -> str:
  """"semseg mIoU 16.81, depth rmse 0.6031, delta_m -40.12%"."""
  # Edge odsF exists only after the offline boundary evaluation.
  scored = [t for t in tasks if metrics.headline_key(t) in results]
  parts = [f"{task} {task_registry.get_task(task).metric} {value:.4g}"
           for task, value in metrics.headline_metrics(results, scored).items()]
  return ", ".join(parts + [f"delta_m {results['delta_m']:+.2f}%"])


def _write_parameter_table(params: PyTree, workdir: epath.Path) -> str:
  """Writes the parameter table to <workdir>/parameters.txt; returns a one-line summary."""
  path = workdir / "parameters.txt"
  if jax.process_index() == 0:
    path.write_text(parameter_overview.get_parameter_overview(params) + "\n")
  leaves = jax.tree.leaves(params)
  count = sum(int(np.prod(x.shape)) for x in leaves)
  size = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  return f"{count:,} parameters ({size / 1e6:.1f} MB); the table is in {path}"


def _finish(record: evaluations.Evaluations, total_steps: int, title: str,
            workdir: epath.Path) -> dict[str, float]:
  """Writes and prints the metrics of the last and the best evaluation; returns the last."""
  if jax.process_index() == 0:
    table = record.write_reports(total_steps, title)
    console.line()
    console.line(table)
    console.line()
    best = record.best_step()
    console.line(f"Metrics:     {workdir / evaluations.LAST_FILE} (last), "
                 f"{workdir / evaluations.BEST_FILE} (best, step {best})")
    console.line(f"Checkpoints: {workdir / 'checkpoints'} (latest), {workdir / 'best'} (best)")
    console.line(f"Pictures:    {workdir / 'predictions'}")
    console.line(f"Logs:        {console.log_file(workdir, 0)}; "
                 f"tensorboard --logdir {workdir}")
  return record[total_steps]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the workdir's newest readable checkpoint, if any) and evaluates.

  Evaluates at the steps of `eval_schedule`, keeps the best state (highest Delta_m) in best/ and
  reports the last and the best evaluation (`iterfuse_jax.evaluations`). On a workdir whose run
  is finished it only reports them. In a multi-host run, process 0 writes the data, the prepared
  dataset, the config, metrics, pictures and TensorBoard files; every process trains.

  SIGTERM or Ctrl-C (SIGINT) while it trains lets the step under way (and its evaluation) finish,
  saves its checkpoint and raises `stopping.TrainingStopped`; the same call resumes from it. In a
  multi-process run every process stops after the same step.

  Returns the metrics of the evaluation after the final step (with "delta_m").
  """
  # pylint: disable=g-import-not-at-top
  from data_pipelines import pipeline as data_pipeline
  from iterfuse_jax.checkpoints import RunCheckpoints
  # pylint: enable=g-import-not-at-top
  workdir = epath.Path(workdir)
  main = jax.process_index() == 0
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; data_dir may be filled
  if main:
    check_workdir(workdir)
  check_shared_workdir(workdir)
  listing = check_same_checkpoints(workdir)
  tasks = tuple(config.dataset.tasks)
  resolve_atrc_genotype(config)
  check_continues_run(config, workdir, bool(listing["checkpoints"] or listing["best"]))
  # A bad model option fails here, before the data are written or prepared (preparing
  # PASCAL-Context's copy takes minutes).
  model = build_model(config)
  dataset = config.dataset.name
  with main_process_first("iterfuse: dataset ready"), warnings.catch_warnings():
    if config.synthetic_data.enabled:
      prepare_synthetic_data(config, workdir)
      # Its splits are small by design, not a truncated download.
      warnings.simplefilter("ignore", io_utils.SplitSizeWarning)
    with console.library_output():  # tensorflow-datasets prints while it prepares the copy
      num_train = data_pipeline.num_examples(config.dataset, config.dataset.train_split)

  epoch_steps = steps_per_epoch(num_train, config.batch_size)
  total_steps = total_train_steps(config, epoch_steps)
  eval_steps = set(eval_schedule(total_steps, epoch_steps, config.eval_every_steps,
                                 config.get("eval_last_epochs", 0)))
  ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                else epoch_steps)
  title = f"{config.model.name} on {dataset} ({', '.join(tasks)})"
  record = evaluations.Evaluations(workdir)
  if (total_steps in record
      and listing["checkpoints"][-1:] == [total_steps]
      and (boundary_eval.TASK not in tasks or BOUNDARY_KEY in record[total_steps])):
    console.line(f"{workdir} holds the finished run of {title} ({total_steps} steps).")
    return _finish(record, total_steps, title, workdir)

  mesh = create_mesh(config.num_devices)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} "
                     "devices of the mesh")

  train_loader = data_pipeline.create_train_dataset(
      config.dataset, config.batch_size, config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  train_iter = iter(train_loader)

  schedule = create_learning_rate_schedule(config, epoch_steps)
  tx = create_optimizer(config, schedule)
  input_shape = (1, *config.dataset.train_size, 3)
  abstract_state = abstract_train_state(config, model, tx, input_shape, mesh)
  jitted_train = jit_train_step(config, schedule, abstract_state, mesh)
  checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
  # A resumed run restores into the state's structure; only a new run initialises one.
  restored = checkpoints.restore_latest(abstract_state, train_iter)
  start_step = 0
  first_batch = None  # a new run's first batch, taken before the loop
  if restored is not None:
    state, start_step = restored
    train_fn = jitted_train  # compiles (or loads) at the first step
  else:
    pretrained = load_pretrained_backbone(config)  # a wrong folder fails before any compile
    # The step is compiled for the batch's shapes and shardings.
    first_batch = shard_batch(next(train_iter), data_sharding)
    with out_of_memory.hint(config):  # XLA may refuse the step's memory as it compiles
      state, train_fn = initialise_while_compiling(
          config, model, tx, jax.random.key(config.seed), input_shape, mesh, jitted_train,
          abstract_state, first_batch, pretrained=pretrained)
  last_saved = start_step if restored is not None else None
  if start_step > total_steps:
    raise WorkdirError(f"the newest checkpoint in {workdir / 'checkpoints'} is of step "
                       f"{start_step}, beyond this config's {total_steps} steps; evaluate it "
                       "with --mode eval or train in another workdir")
  if main:
    # What `iterfuse_jax.inference.load_predictor` and the comparison table read back; written
    # once the config is known to continue the stored run (check_continues_run) and to fit its
    # checkpoints, so that a refused command leaves the record as it was.
    evaluations.write_atomic(workdir / inference.CONFIG_FILE,
                             config.to_json_best_effort(indent=2, sort_keys=True))

  use_clu = summaries.clu_writers_usable()
  writer = summaries.create_writer(str(workdir), just_logging=not main, use_tensorflow=use_clu)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))
  # An out-of-memory error of the materialized IFB names the streamed option.
  train_fn = out_of_memory.with_hint(train_fn, config)
  metrics_cls = metrics.make_eval_metrics(tasks, dataset)
  options = determinism.compiler_options(config)
  # Replicated results: every host computes the same metrics and takes the same decisions.
  jitted_eval = jax.jit(functools.partial(eval_step, tasks=tasks, metrics_cls=metrics_cls,
                                          resize_order=config.eval_resize),
                        out_shardings=replicated, compiler_options=options)
  # Each host takes its own examples' predictions (`host_rows`): with several processes a
  # replicated result gave every host the first host's rows.
  jitted_predict = jax.jit(predict_step, out_shardings=data_sharding, compiler_options=options)

  hooks = []
  if main:
    hooks = summaries.create_hooks(str(workdir), writer, total_steps=total_steps,
                                   log_every_steps=config.log_every_steps,
                                   profile_steps=config.profile_steps, start_step=start_step,
                                   use_tensorflow=use_clu)

  def run_eval(step: int) -> None:
    """Evaluates the state of `step` unless the record has it (an evaluation done before the
    run was killed): metrics to TensorBoard and the record, pictures, the best checkpoint."""
    if step in record:
      return
    # Preparing checks the prepared copy against the split files; should they have changed
    # since the start, process 0 alone prepares it again.
    with main_process_first(f"iterfuse: eval data of step {step} ready"):
      eval_batches = create_eval_batches(config)
    results = add_delta_m(
        evaluate(state, jitted_eval, eval_batches, data_sharding, len(eval_batches),
                 desc=f"eval @ {step}"), config, tasks)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    first = next(iter(eval_batches))
    images = summary_images(state, jitted_predict, first, tasks, dataset,
                            config.num_eval_images, data_sharding)
    writer.write_images(step, {f"eval/{k}": v for k, v in images.items()})
    if main:
      save_prediction_images(images, workdir / "predictions")
    record.add(step, results)
    best = record.is_best(step)
    if best:  # saved before the record, so that a recorded best always has its checkpoint
      checkpoints.save_best(step, state, results["delta_m"])
    if main:
      record.write()
    console.line(f"eval @ step {step}: {_headline_text(results, tasks)}"
                 + (" (best so far)" if best and len(record) > 1 else ""))
    logging.info("Eval at step %d: %s", step, results)

  # From the first line the user sees on, SIGTERM and Ctrl-C stop after a step with its
  # checkpoint (iterfuse_jax/stopping.py).
  stop = stopping.StopSignals()
  stop.install()
  try:
    devices = f"{mesh.size} {mesh.devices.flat[0].platform.upper()} device(s)"
    if jax.process_count() > 1:
      devices += f" in {jax.process_count()} processes"
    console.line(f"Training {title}: {total_steps} steps of batch {config.batch_size} "
                 f"({epoch_steps} per epoch) on {devices}, in {workdir}"
                 + (f"; resuming from step {start_step}" if start_step else ""))
    console.line(f"Model: {_write_parameter_table(state.params, workdir)}")
    logging.info("Training %s for %d steps (%d per epoch) on %s, from step %d; evaluations at "
                 "steps %s", title, total_steps, epoch_steps, devices, start_step,
                 sorted(eval_steps))

    if start_step in eval_steps:  # killed between the save and the evaluation of this step
      run_eval(start_step)
    train_metrics = []
    last_log_time, last_log_step = time.time(), start_step
    input_s = 0.0  # the loop's time in the input pipeline since the last log
    # Compiling the step and evaluating are not training: images/s and input_fraction leave
    # them out (checkpoint saves stay in: the loop waits for them while it trains).
    excluded_s = 0.0
    with console.progress(total=total_steps, initial=start_step, desc="train") as bar:
      for step in range(start_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          if first_batch is not None:
            batch, first_batch = first_batch, None
          else:
            fetch_start = time.perf_counter()
            batch = next(train_iter)
            input_s += time.perf_counter() - fetch_start
            batch = shard_batch(batch, data_sharding)
          call_start = time.perf_counter()
          state, step_metrics = train_fn(state, batch)
          # The first call of a resumed run compiles (or loads) the step; every first call
          # waits for its results (out_of_memory.with_hint).
          if step == start_step + 1:
            excluded_s += time.perf_counter() - call_start
        train_metrics.append(step_metrics)
        for hook in hooks:
          hook(step)

        log_now = step == total_steps or step % config.log_every_steps == 0
        save_now = step == total_steps or step % ckpt_every == 0
        eval_now = step in eval_steps
        if log_now or save_now or eval_now:
          # Nothing is logged, saved or evaluated from a state past a non-finite step.
          _check_finite(state, last_saved, workdir)
        if log_now:
          summary = {k: float(np.mean([m[k] for m in jax.device_get(train_metrics)]))
                     for k in train_metrics[0]}
          elapsed = max(time.time() - last_log_time - excluded_s, 1e-9)
          summary["images_per_second"] = (step - last_log_step) * config.batch_size / elapsed
          # The steps are dispatched asynchronously, so the loop waits for the device only when
          # it reads results; the share of the wall time it spent getting batches says whether
          # the input pipeline keeps ahead (near 1: it does not; raise dataset.read_threads or
          # dataset.num_workers).
          summary["input_fraction"] = min(1.0, input_s / elapsed)
          writer.write_scalars(step, summary)
          bar.set_postfix({"loss": f"{summary['loss/total']:.3f}",
                           "img/s": f"{summary['images_per_second']:.1f}",
                           "input": f"{summary['input_fraction']:.0%}"}, refresh=False)
          train_metrics = []
          last_log_time, last_log_step, input_s, excluded_s = time.time(), step, 0.0, 0.0
        bar.update(1)

        if save_now:
          checkpoints.save(step, state, train_iter)
          last_saved = step
        if eval_now:
          eval_start = time.perf_counter()
          run_eval(step)
          excluded_s += time.perf_counter() - eval_start
        writer.flush()
        if stop.should_stop(step, checkpoints.reached_preemption):
          if last_saved != step:
            _check_finite(state, last_saved, workdir)
            checkpoints.save(step, state, train_iter)
          logging.info("Stopped after step %d on a signal; its checkpoint is being saved", step)
          raise stop.stopped(step, workdir / "checkpoints")
    for hook in hooks:
      if isinstance(hook, summaries.ProfileSteps):
        hook.close()  # a trace the run's end cut short

    # Edge odsF is scored offline (slow) on the saved predictions of the reported states: the last
    # and, when it differs, the best one (whose weights best/ holds).
    for step, which in ((total_steps, "last"), (record.best_step(), "best")):
      if boundary_eval.TASK not in tasks or BOUNDARY_KEY in record[step]:
        continue
      step_state = state
      if step != total_steps:
        step_state, best_saved = checkpoints.restore_state(state, "best")
        if best_saved != step:
          logging.warning("No edge odsF for the best evaluation (step %d): best/ holds step %d",
                          step, best_saved)
          continue
      console.line(f"Boundary evaluation of the {which} state (step {step}) ...")
      boundary = boundary_metrics(config, workdir, step_state, jitted_predict, data_sharding)
      if boundary:
        record.add(step, add_delta_m({**record[step], **boundary}, config, tasks))
      if main:
        record.write()
    writer.flush()
  finally:
    stop.uninstall()
    checkpoints.close()  # waits for a save still being written (a stopped run keeps it)
    train_iter.close()  # stops its worker processes now, not when it is collected
  return _finish(record, total_steps, title, workdir)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = "latest",
                        save_predictions: bool = False) -> dict[str, float]:
  """Evaluates the latest (or best) checkpoint of a workdir; prints and returns the metrics.

  save_predictions: also write every task's prediction of every eval image to
  <workdir>/predictions/<task>/ in the survey's file formats (`prediction_files`, which also
  scores such a folder).
  """
  # pylint: disable-next=g-import-not-at-top
  from iterfuse_jax.checkpoints import RunCheckpoints
  workdir = epath.Path(workdir)
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  folder = workdir / ("checkpoints" if which == "latest" else "best")
  if not check_same_checkpoints(workdir)[folder.name]:
    raise FileNotFoundError(f"no {which} checkpoint in {folder}; train first (the same command "
                            "without --mode eval)")
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pretrained = ""  # the checkpoint holds every weight
  resolve_atrc_genotype(config)
  check_continues_run(config, workdir, has_checkpoints=True)
  tasks = tuple(config.dataset.tasks)
  mesh = create_mesh(config.num_devices)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = build_model(config)
  tx = create_optimizer(config, lambda step: 0.0)
  checkpoints = RunCheckpoints(workdir, config.keep_checkpoints, read_only=True)
  state, step = checkpoints.restore_state(
      abstract_train_state(config, model, tx, (1, *config.dataset.train_size, 3), mesh), which)
  metrics_cls = metrics.make_eval_metrics(tasks, config.dataset.name)
  options = determinism.compiler_options(config)
  jitted_eval = jax.jit(functools.partial(eval_step, tasks=tasks, metrics_cls=metrics_cls,
                                          resize_order=config.eval_resize),
                        out_shardings=NamedSharding(mesh, PartitionSpec()),
                        compiler_options=options)
  # Process 0 writes and prepares the data if they are missing; the others read what it made.
  with main_process_first("iterfuse: eval data ready"), warnings.catch_warnings():
    if config.synthetic_data.enabled:  # small splits by design, as in training
      if not config.dataset.data_dir:
        prepare_synthetic_data(config, workdir)
      warnings.simplefilter("ignore", io_utils.SplitSizeWarning)
    with console.library_output():  # tensorflow-datasets prints while it prepares the copy
      eval_batches = create_eval_batches(config)
  results = evaluate(state, jitted_eval, eval_batches, data_sharding, len(eval_batches))
  jitted_predict = jax.jit(predict_step, out_shardings=data_sharding, compiler_options=options)
  directory = workdir / prediction_files.WORKDIR_SUBDIR
  if save_predictions:
    count = write_prediction_files(config, directory, state, jitted_predict, data_sharding)
    logging.info("Wrote the predictions of %d images to %s", count, directory)
  results.update(boundary_metrics(config, workdir, state, jitted_predict, data_sharding,
                                  written=save_predictions))
  results = add_delta_m(results, config, tasks)
  console.line(results_table(results, f"{which} checkpoint (step {step}) of {workdir}"))
  if save_predictions:
    console.line(f"Predictions of the {which} checkpoint: {directory}/<task>/ "
                 "(score them: python -m iterfuse_jax.prediction_files "
                 f"{workdir})")
  checkpoints.close()
  return results


def create_eval_batches(config: ml_collections.ConfigDict):
  """This host's share of the eval split: every process_count-th example, its part of the batch.

  Every host yields the same number of (padded) batches, so the sharded eval steps line up.
  """
  from data_pipelines import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  return data_pipeline.create_eval_dataset(
      config.dataset, config.batch_size // jax.process_count(), shard_index=jax.process_index(),
      shard_count=jax.process_count())


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
