"""Training and evaluation: `train_and_evaluate(config, workdir)` and the jitted step functions.

Data parallel over a 1-D device mesh ("data"): the global batch is sharded over all devices of all
hosts, parameters and optimiser state are replicated, and `jax.jit` inserts the collectives, so
BatchNorm statistics and gradients are those of the global batch. The same code runs on 1 device
and on N.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import pipeline as data_pipeline
from iterfuse_jax import boundary_eval, inference, losses, metrics, visualization
from iterfuse_jax.checkpoints import RunCheckpoints
from iterfuse_jax.models import build_model

PyTree = Any
Batch = Mapping[str, np.ndarray]
# Keys of an eval batch that stay on the host (strings cannot become jax arrays).
HOST_ONLY_KEYS = ("image_id",)


class TrainState(train_state.TrainState):
  """Flax train state plus BatchNorm statistics and the non-finite-loss guard.

  `nonfinite_step` is -1 while every loss has been finite; otherwise the (1-based) step of the
  first non-finite loss, after which updates are skipped, so the state stays the last good one.
  """

  batch_stats: PyTree = None
  nonfinite_step: jax.Array = None


class NonFiniteLossError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------- optimiser


def steps_per_epoch(num_train_examples: int, batch_size: int) -> int:
  if num_train_examples < batch_size:
    raise ValueError(
        f"the training split has {num_train_examples} examples, fewer than one global batch "
        f"of {batch_size}")
  return num_train_examples // batch_size


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  epoch_steps: int) -> optax.Schedule:
  """Poly schedule stepped per epoch: lr * (1 - epoch / num_epochs) ** power."""
  opt = config.optimizer
  per_epoch = optax.polynomial_schedule(
      init_value=opt.learning_rate, end_value=0.0, power=opt.poly_power,
      transition_steps=config.num_epochs)
  return lambda step: per_epoch(step // epoch_steps)


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


def train_step(state: TrainState, batch: Batch, *, tasks: tuple[str, ...],
               loss_weights: Mapping[str, float],
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a (global) batch; returns the new state and scalar metrics."""

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"])
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


def resize_to_label_size(logits: jax.Array, original_size: jax.Array,
                         label_shape: tuple[int, int]) -> jax.Array:
  """Bilinearly resizes each prediction to its image's original size inside a padded canvas.

  logits: [B, h, w, C] at the network's input size; original_size: [B, 2] (height, width);
  label_shape: (H, W) of the padded labels. Returns [B, H, W, C] whose top-left
  original_size[b] region is the resized prediction (the rest is scored as padding: ignored).
  """
  h, w = logits.shape[1:3]

  def one(x, hw):
    scale = hw.astype(jnp.float32) / jnp.array([h, w], jnp.float32)
    return jax.image.scale_and_translate(
        x, (*label_shape, x.shape[-1]), spatial_dims=(0, 1), scale=scale,
        translation=jnp.zeros(2, jnp.float32), method="linear", antialias=False)

  return jax.vmap(one)(logits, original_size)


def eval_step(state: TrainState, batch: Batch, *, tasks: tuple[str, ...],
              metrics_cls: type) -> Any:
  """Predictions of one eval batch scored at the original image size; returns metric states."""
  outputs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                           batch["image"], train=False)
  predictions, labels = {}, {}
  for task in tasks:
    predictions[task] = resize_to_label_size(outputs["final"][task], batch["original_size"],
                                             batch[task].shape[1:3])
    labels[task] = batch[task]
  return metrics_cls.single_from_model_output(
      predictions=predictions, labels=labels, example_mask=batch["example_mask"])


def predict_step(state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
  """Final predictions [B, H, W, C_task] of the model in eval mode."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        images, train=False)["final"]


# ----------------------------------------------------------------------------- setup


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


def create_train_state(config: ml_collections.ConfigDict, model, tx, rng: jax.Array,
                       input_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
  """Initialises parameters, BatchNorm statistics and optimiser state, replicated on `mesh`."""

  def init(rng):
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx,
                             nonfinite_step=jnp.array(-1, jnp.int32))

  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = jax.eval_shape(init, rng)
  state = jax.jit(init, out_shardings=jax.tree.map(lambda _: replicated, abstract))(rng)
  if config.model.pretrained:
    state = load_pretrained_backbone(state, config.model.pretrained, config.model.backbone,
                                     replicated)
  return state


def load_pretrained_backbone(state: TrainState, path: str, variant: str,
                             sharding: NamedSharding) -> TrainState:
  """Replaces the "backbone" sub-tree by a converted ImageNet checkpoint (and resets Adam)."""
  from iterfuse_jax import convert_imagenet  # pylint: disable=g-import-not-at-top

  backbone = convert_imagenet.load_backbone_variables(path, variant)
  variables = convert_imagenet.insert_backbone(
      {"params": state.params, "batch_stats": state.batch_stats}, backbone)
  variables = jax.device_put(variables, sharding)
  logging.info("Initialised the backbone from %s", path)
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=state.tx.init(variables["params"]))


def prepare_synthetic_data(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Writes the synthetic dataset the config asks for, unless it is already there."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

  syn = config.synthetic_data
  name = config.dataset.name
  if not config.dataset.data_dir:
    folder = {"nyud": "NYUD_MT_synthetic", "pascal": "PASCAL_MT_synthetic"}[name]
    config.dataset.data_dir = str(workdir / "data" / folder)
  data_dir = epath.Path(config.dataset.data_dir)
  if data_dir.exists():
    return
  if jax.process_index() == 0:
    writer = {"nyud": synthetic.write_nyud, "pascal": synthetic.write_pascal}[name]
    logging.info("Writing synthetic %s data to %s", name, data_dir)
    writer(str(data_dir), num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed,
           height=syn.height, width=syn.width)


def shard_batch(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
  """Turns this host's part of a global batch into global arrays sharded over "data"."""
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in batch.items() if key not in HOST_ONLY_KEYS
  }


# ----------------------------------------------------------------------------- evaluation


def evaluate(state: TrainState, jitted_eval: Callable, eval_batches, sharding: NamedSharding,
             num_batches: int | None = None) -> dict[str, float]:
  """Runs the eval steps over all eval batches and returns the computed metrics."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  merged = None
  for batch in tqdm(eval_batches, total=num_batches, desc="eval", leave=False,
                    disable=jax.process_index() > 0):
    update = jitted_eval(state, shard_batch(batch, sharding))
    merged = update if merged is None else merged.merge(update)
  if merged is None:
    raise ValueError("the evaluation split yielded no batch")
  return {name: float(value) for name, value in merged.compute().items()}


def summary_images(state: TrainState, jitted_predict: Callable, batch: Batch,
                   tasks: tuple[str, ...], dataset: str, count: int,
                   sharding: NamedSharding) -> dict[str, np.ndarray]:
  """Input, ground truth and prediction images ([N, H, W, 3] uint8) for the first examples."""
  images = shard_batch({"image": batch["image"]}, sharding)["image"]
  predictions = jax.device_get(jitted_predict(state, images))
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
                     jitted_predict: Callable, sharding: NamedSharding) -> dict[str, float]:
  """Edge odsF over the saved predictions of the eval split (`boundary_eval`); {} without edge."""

  def predict(images: np.ndarray) -> np.ndarray:
    sharded = shard_batch({"image": images}, sharding)["image"]
    return jax.device_get(jitted_predict(state, sharded)[boundary_eval.TASK])

  return boundary_eval.run(config, workdir, create_eval_batches(config), predict)


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


def _check_finite(state: TrainState, last_saved: int | None, workdir: epath.Path) -> None:
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    where = (f"the last good checkpoint is step {last_saved} in {workdir / 'checkpoints'}"
             if last_saved is not None else "no checkpoint had been written")
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad}; training stopped ({where}). Lower "
        "optimizer.learning_rate or check the input data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the workdir's last checkpoint if any) and evaluates.

  Returns the final evaluation metrics (with "delta_m").
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; data_dir may be filled
  if config.synthetic_data.enabled:
    prepare_synthetic_data(config, workdir)
  if jax.process_index() == 0:
    # What `iterfuse_jax.inference.load_predictor` and the comparison table read back.
    (workdir / inference.CONFIG_FILE).write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))
  tasks = tuple(config.dataset.tasks)
  dataset = config.dataset.name

  mesh = create_mesh(config.num_devices)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} "
                     "devices of the mesh")

  epoch_steps = steps_per_epoch(
      data_pipeline.num_examples(config.dataset, config.dataset.train_split), config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * epoch_steps)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else epoch_steps
  ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                else epoch_steps)

  train_loader = data_pipeline.create_train_dataset(
      config.dataset, config.batch_size, config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  train_iter = iter(train_loader)

  model = build_model(config)
  schedule = create_learning_rate_schedule(config, epoch_steps)
  tx = create_optimizer(config, schedule)
  h, w = config.dataset.train_size
  state = create_train_state(config, model, tx, jax.random.key(config.seed),
                             (1, h, w, 3), mesh)

  checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
  restored = checkpoints.restore_latest(state, train_iter)
  start_step = 0
  if restored is not None:
    state, start_step = restored
  last_saved = start_step if restored is not None else None

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))
    parameter_overview.log_parameter_overview(state.params)
  logging.info("Training %s on %s (%s) for %d steps (%d per epoch) on %d devices, from step %d",
               config.model.name, dataset, ",".join(tasks), total_steps, epoch_steps,
               mesh.size, start_step)

  state_sharding = jax.tree.map(lambda _: replicated, state)
  jitted_train = jax.jit(
      functools.partial(train_step, tasks=tasks, loss_weights=dict(config.loss_weights),
                        schedule=schedule),
      in_shardings=(state_sharding, data_sharding), out_shardings=(state_sharding, replicated),
      donate_argnums=(0,))
  metrics_cls = metrics.make_eval_metrics(tasks, dataset)
  jitted_eval = jax.jit(functools.partial(eval_step, tasks=tasks, metrics_cls=metrics_cls))
  jitted_predict = jax.jit(predict_step)

  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                                 every_steps=config.log_every_steps))
    if config.profile_steps > 0:
      hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                            logdir=str(workdir), first_profile=start_step + 2))

  def run_eval(step: int) -> dict[str, float]:
    eval_batches = create_eval_batches(config)
    results = add_delta_m(
        evaluate(state, jitted_eval, eval_batches, data_sharding, len(eval_batches)),
        config, tasks)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    first = next(iter(eval_batches))
    images = summary_images(state, jitted_predict, first, tasks, dataset,
                            config.num_eval_images, data_sharding)
    writer.write_images(step, {f"eval/{k}": v for k, v in images.items()})
    if jax.process_index() == 0:
      save_prediction_images(images, workdir / "predictions")
    checkpoints.save_best(step, state, results["delta_m"])
    logging.info("Eval at step %d: %s", step, results)
    return results

  train_metrics = []
  last_log_time, last_log_step = time.time(), start_step
  results = None
  for step in range(start_step + 1, total_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      batch = shard_batch(next(train_iter), data_sharding)
      state, step_metrics = jitted_train(state, batch)
    train_metrics.append(step_metrics)
    for hook in hooks:
      hook(step)

    last = step == total_steps
    log_now = last or step % config.log_every_steps == 0
    save_now = last or step % ckpt_every == 0
    eval_now = last or step % eval_every == 0
    if log_now or save_now or eval_now:
      # Nothing is logged, saved or evaluated from a state past a non-finite step.
      _check_finite(state, last_saved, workdir)
    if log_now:
      summary = {k: float(np.mean([m[k] for m in jax.device_get(train_metrics)]))
                 for k in train_metrics[0]}
      elapsed = time.time() - last_log_time
      summary["images_per_second"] = (step - last_log_step) * config.batch_size / elapsed
      writer.write_scalars(step, summary)
      train_metrics = []
      last_log_time, last_log_step = time.time(), step

    if save_now:
      checkpoints.save(step, state, train_iter)
      last_saved = step
    if eval_now:
      results = run_eval(step)
    writer.flush()

  if results is None:  # resumed at (or beyond) the final step: evaluate what is there
    results = run_eval(max(start_step, total_steps))
  boundary = boundary_metrics(config, workdir, state, jitted_predict, data_sharding)
  if boundary:
    results = add_delta_m({**results, **boundary}, config, tasks)
  table = results_table(results, f"{config.model.name} on {dataset}, step {total_steps}")
  print(table)
  if jax.process_index() == 0:
    (workdir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (workdir / "metrics.md").write_text(table + "\n")
  writer.flush()
  checkpoints.close()
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = "latest") -> dict[str, float]:
  """Evaluates the latest (or best) checkpoint of a workdir; prints and returns the metrics."""
  workdir = epath.Path(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pretrained = ""  # the checkpoint holds every weight
  if config.synthetic_data.enabled and not config.dataset.data_dir:
    prepare_synthetic_data(config, workdir)
  tasks = tuple(config.dataset.tasks)
  mesh = create_mesh(config.num_devices)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = build_model(config)
  h, w = config.dataset.train_size
  tx = create_optimizer(config, lambda step: 0.0)
  state = create_train_state(config.copy_and_resolve_references(), model, tx,
                             jax.random.key(0), (1, h, w, 3), mesh)
  checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
  state, step = checkpoints.restore_state(state, which)
  metrics_cls = metrics.make_eval_metrics(tasks, config.dataset.name)
  jitted_eval = jax.jit(functools.partial(eval_step, tasks=tasks, metrics_cls=metrics_cls))
  eval_batches = create_eval_batches(config)
  results = evaluate(state, jitted_eval, eval_batches, data_sharding, len(eval_batches))
  results.update(boundary_metrics(config, workdir, state, jax.jit(predict_step), data_sharding))
  results = add_delta_m(results, config, tasks)
  print(results_table(results, f"{which} checkpoint (step {step}) of {workdir}"))
  checkpoints.close()
  return results


def create_eval_batches(config: ml_collections.ConfigDict):
  """This host's share of the eval split: every process_count-th example, its part of the batch.

  Every host yields the same number of (padded) batches, so the sharded eval steps line up.
  """
  return data_pipeline.create_eval_dataset(
      config.dataset, config.batch_size // jax.process_count(), shard_index=jax.process_index(),
      shard_count=jax.process_count())


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
