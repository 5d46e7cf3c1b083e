"""Baselines and ablation rows: every config trains and evaluates at a tiny size; module structure.

Most tests swap HRNet for a tiny backbone (four maps at strides 4/8/16/32) to stay fast; the real
backbone is checked abstractly (shapes only) with `jax.eval_shape`.
"""

import importlib
from unittest import mock

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax import losses
from iterfuse_jax.models import build
from iterfuse_jax.models.cross_task import SpatialSelfAttention, TaskPairInteractionModule
from iterfuse_jax.models.densemtl import CorrelationGuidedAttention, DenseMTLDistillation
from iterfuse_jax.models.layers import BasicBlock
from iterfuse_jax.models.mtinet import FeaturePropagation, MTINet, SqueezeExcitation
from iterfuse_jax.models.padnet import PADNet, PADNetDistillation
from iterfuse_jax.convert_imagenet import backbone_paths
from iterfuse_jax.models.stl import STLNet

ROWS = ("stl", "mtl", "padnet", "mtinet", "densemtl", "atrc", "noifb", "ifbA", "ifbB", "ifbC")
SIZE = (32, 32)
BRANCH_CHANNELS = (4, 6, 8, 10)
PASCAL_TASKS = ("semseg", "human_parts", "sal")


class TinyBackbone(nn.Module):
  """Stand-in for HRNet: 4 maps at strides 4/8/16/32 with BRANCH_CHANNELS channels, BN included."""

  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    outs = []
    for i, (stride, channels) in enumerate(zip((4, 8, 16, 32), BRANCH_CHANNELS)):
      x = nn.Conv(channels, (stride, stride), strides=stride, name=f"branch{i}")(images)
      x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
      outs.append(nn.relu(x).astype(self.dtype))
    return outs


def key(seed=0):
  # threefry's initialisers take ~10 s to compile on a CPU; rbg keys compile in a fraction.
  return jax.random.key(seed, impl="rbg")


def tiny_backbone(model_config, dtype):
  del model_config
  return TinyBackbone(dtype)


def row_config(dataset, row, task_channels=8):
  config = importlib.import_module(f"configs.{dataset}_{row}").get_config()
  config.unlock()
  config.model.task_channels = task_channels
  config.model.initial_blocks = 1
  config.model.tpim.n_iter = min(config.model.tpim.n_iter, 3)
  config.dataset.train_size = SIZE
  return config


def build_tiny(config):
  with mock.patch.object(build, "make_backbone", tiny_backbone):
    return build.build_model(config)


def fake_batch(dataset, tasks, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  out = {"image": jnp.asarray(rng.normal(size=(batch, *SIZE, 3)), jnp.float32)}
  for task in tasks:
    if task == "semseg":
      out[task] = jnp.asarray(rng.integers(0, 21 if dataset == "pascal" else 40, (batch, *SIZE)))
    elif task == "human_parts":
      out[task] = jnp.asarray(rng.integers(0, 7, (batch, *SIZE)))
    elif task == "sal":
      out[task] = jnp.asarray(rng.integers(0, 2, (batch, *SIZE)))
    else:
      out[task] = jnp.asarray(rng.uniform(0.5, 5.0, (batch, *SIZE)), jnp.float32)
  return out


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def train_and_eval_fn(model, tasks, weights):
  """init -> one train-mode forward + gradient of the multi-task loss -> eval-mode forward."""

  def fn(batch):
    variables = model.init(key(0), batch["image"], train=False)

    def loss_fn(params):
      outputs, updates = model.apply({**variables, "params": params}, batch["image"], train=True,
                                     mutable=["batch_stats"], rngs={"dropout": key(1)})
      return losses.multitask_loss(outputs, batch, tasks, weights)[0], (outputs, updates)

    (loss, (train_out, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    eval_out = model.apply({"params": variables["params"], **updates}, batch["image"],
                           train=False)
    return loss, grads, train_out, eval_out, variables, updates

  return fn


def check_outputs(outputs, dataset, tasks, levels):
  assert set(outputs) == levels
  for level in outputs.values():
    assert set(level) == set(tasks)
    for task in tasks:
      assert level[task].shape == (2, *SIZE, config_outputs(dataset, task))
      assert level[task].dtype == jnp.float32


@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
@pytest.mark.parametrize("row", ROWS)
def test_every_config_builds_and_traces_a_train_and_eval_step(dataset, row):
  """Every row's config, shrunk: the whole init/train/eval step traces with the right shapes."""
  config = row_config(dataset, row)
  tasks = tuple(config.dataset.tasks)
  model = build_tiny(config)
  batch = fake_batch(dataset, tasks)
  loss, grads, train_out, eval_out, variables, updates = jax.eval_shape(
      train_and_eval_fn(model, tasks, dict(config.loss_weights)), batch)
  assert loss.shape == () and loss.dtype == jnp.float32
  levels = {"final"} if row in ("stl", "mtl") else {"initial", "final"}
  if row == "mtinet":  # every scale is deeply supervised, as in the survey code
    levels |= {"initial_scale1", "initial_scale2", "initial_scale3"}
  check_outputs(train_out, dataset, tasks, levels)
  check_outputs(eval_out, dataset, tasks, levels)
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  expected_model = {"stl": "STLNet", "mtinet": "MTINet", "padnet": "PADNet"}.get(
      row, "MultiTaskDenseNet")
  assert type(model).__name__ == expected_model


# Compile without the expensive XLA passes: these steps run once.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize("row", [
    "stl", "mtl", "padnet", "densemtl", "ifbC",
    pytest.param("mtinet", marks=pytest.mark.slow),
])
def test_train_step_runs(row):
  """One real train step (NYUD rows): finite loss, every parameter learns, BN statistics move."""
  config = row_config("nyud", row)
  if row == "mtinet":
    config.model.mtinet.se_reduction = 1  # every channel a hidden unit: no all-dead tiny SE block
  tasks = tuple(config.dataset.tasks)
  model = build_tiny(config)
  batch = fake_batch("nyud", tasks)
  step = jax.jit(train_and_eval_fn(model, tasks, dict(config.loss_weights)))
  lowered = step.lower(batch)
  # XLA has no deterministic GPU kernel for it (iterfuse_jax/determinism.py).
  assert "select_and_scatter" not in lowered.as_text()
  compiled = lowered.compile(compiler_options=FAST_COMPILE)
  loss, grads, train_out, eval_out, variables, updates = compiled(batch)

  assert np.isfinite(float(loss)) and float(loss) > 0
  for out in (train_out, eval_out):
    for level in out.values():
      assert all(np.all(np.isfinite(np.asarray(x))) for x in level.values())
  flat = _flat(grads)
  dead = sorted(name for name, g in flat.items() if not np.any(np.asarray(g)))
  if row == "densemtl":
    # DenseMTL's correlation branch sits behind gamma = 0: only gamma learns at first.
    assert dead and all("/correlation/" in n and not n.endswith("gamma") for n in dead), dead
  else:
    assert not dead, f"parameters without gradient: {dead}"
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(updates["batch_stats"]),
                                                 jax.tree.leaves(variables["batch_stats"]))]
  assert moved and all(moved)


def config_outputs(dataset, task):
  return {"semseg": 40 if dataset == "nyud" else 21, "depth": 1, "human_parts": 7, "sal": 1}[task]


@pytest.mark.parametrize("row", ["stl", "mtinet"])
def test_real_hrnet_shapes(row):
  """With the real HRNet18 (abstractly), every baseline wires up and predicts at input size."""
  config = row_config("pascal", row, task_channels=16)
  model = build.build_model(config)
  images = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(key(0), x), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert out["final"]["semseg"].shape == (1, 64, 96, 21)
  assert out["final"]["sal"].shape == (1, 64, 96, 1)
  params = variables["params"]
  if row == "stl":
    assert sorted(params) == sorted(f"networks_{t}" for t in PASCAL_TASKS)
    assert backbone_paths(params) == [(f"networks_{t}", "backbone") for t in sorted(PASCAL_TASKS)]
    for path in backbone_paths(params):
      assert "stage4" in params[path[0]][path[1]]
  if row == "mtinet":
    # Task features keep each HRNet scale's channels: 18/36/72/144, so heads see 270.
    for scale, channels in enumerate((18, 36, 72, 144)):
      kernel = params[f"scale{scale}_initial_semseg"]["predict"]["kernel"]
      assert kernel.shape == (1, 1, channels, 21)
    assert params["head_semseg"]["conv"]["kernel"].shape == (1, 1, 270, 270)


# ----------------------------------------------------------------------------- structure


def _features(tasks, channels=6, size=(8, 8), seed=0):
  rng = np.random.default_rng(seed)
  return {t: jnp.asarray(rng.normal(size=(2, *size, channels)), jnp.float32) for t in tasks}


def test_padnet_distillation_is_a_sum_over_the_other_tasks():
  features = _features(PASCAL_TASKS)
  module = PADNetDistillation(PASCAL_TASKS, channels=6)
  variables = jax.jit(lambda f: module.init(key(1), f))(features)
  params = variables["params"]
  assert sorted(params) == sorted(
      f"sa_{s}_to_{t}" for t in PASCAL_TASKS for s in PASCAL_TASKS if s != t)
  out = jax.jit(module.apply)(variables, features)
  sa = jax.jit(SpatialSelfAttention(6).apply)
  for target in PASCAL_TASKS:
    expected = features[target] + sum(
        sa({"params": params[f"sa_{s}_to_{target}"]}, features[s])
        for s in PASCAL_TASKS if s != target)
    np.testing.assert_allclose(out[target], expected, rtol=1e-5, atol=1e-5)
  # A single task has nothing to distil from: identity.
  single = PADNetDistillation(("semseg",), channels=6)
  alone = {"semseg": features["semseg"]}
  single_vars = single.init(key(0), alone)
  assert not single_vars
  np.testing.assert_array_equal(single.apply(single_vars, alone)["semseg"], features["semseg"])


def test_padnet_rejects_mismatched_features():
  features = _features(("semseg", "depth"))
  features["depth"] = features["depth"][..., :4]
  with pytest.raises(ValueError, match="PADNetDistillation expects"):
    PADNetDistillation(("semseg", "depth"), channels=6).init(key(0), features)


def test_iterfuse_diagonal_is_identity():
  """With every CIB silenced, the TPIM returns its input: the N diagonal blocks are identities."""
  tasks = ("semseg", "depth")
  features = _features(tasks)
  tpim = TaskPairInteractionModule(tasks, channels=6, n_iter=3)
  variables = jax.jit(lambda f: tpim.init(key(0), f, train=False))(features)
  apply = jax.jit(lambda v, f: tpim.apply(v, f, train=False))
  names = sorted(variables["params"])
  assert names == ["cib_depth_to_semseg", "cib_semseg_to_depth"]
  # Zero the self-attention features and the value projection: every CIB then outputs 0.
  silenced = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if any(
          getattr(p, "key", None) in ("features", "value") for p in path) else x,
      variables["params"])
  out = apply({**variables, "params": silenced}, features)
  for t in tasks:
    np.testing.assert_array_equal(out[t], features[t])
  out = apply(variables, features)
  assert not np.allclose(out["semseg"], features["semseg"])


def test_densemtl_mixing_starts_at_zero():
  tasks = ("semseg", "depth")
  features = _features(tasks, size=(8, 12))
  module = DenseMTLDistillation(tasks, channels=6, scale=2)
  variables = jax.jit(lambda f: module.init(key(0), f, train=False))(features)
  apply = jax.jit(lambda v, f: module.apply(v, f, train=False, mutable=["intermediates"]))
  params = variables["params"]
  assert sorted(params) == ["fuse_depth", "fuse_semseg", "xtam_depth_to_semseg",
                            "xtam_semseg_to_depth"]
  gammas = {k: v for k, v in _flat(params).items() if k.endswith("gamma")}
  assert len(gammas) == 2 and all(g.shape == (6,) and not np.any(g) for g in gammas.values())
  out, state = apply(variables, features)
  correlations = jax.tree_util.tree_leaves(state["intermediates"])
  assert len(correlations) == 2 and all(not np.any(c) for c in correlations)
  assert out["semseg"].shape == features["semseg"].shape

  # gamma = 0 switches the correlation-guided attention off but lets it learn: it has a gradient.
  def loss(p):
    o = module.apply({**variables, "params": p}, features, train=False)
    return sum(jnp.sum(jnp.sin(x)) for x in o.values())

  grads = _flat(jax.jit(jax.grad(loss))(params))
  assert all(np.abs(np.asarray(grads[k])).max() > 0 for k in gammas)

  # With gamma = 1 the correlation branch contributes and the output changes.
  ones = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ones_like(x) if getattr(path[-1], "key", "") == "gamma" else x, params)
  changed, state = apply({**variables, "params": ones}, features)
  assert all(np.any(c) for c in jax.tree_util.tree_leaves(state["intermediates"]))
  assert not np.allclose(changed["semseg"], out["semseg"])


def test_densemtl_correlation_attention_matches_direct_computation():
  """Queries on the stride-2 subsampled target, keys/values max-pooled from the source."""
  c = 3
  target = jax.random.normal(key(0), (1, 4, 6, c))
  source = jax.random.normal(key(1), (1, 4, 6, c))
  module = CorrelationGuidedAttention(c, scale=2)
  variables = module.init(key(2), target, source, train=False)
  # Projections = identity 1x1 convs; BN in eval mode at init divides by sqrt(1 + eps).
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.eye(c).reshape(1, 1, c, c) if getattr(path[-1], "key", "") == "kernel"
                       else jnp.full_like(x, 2.0) if getattr(path[-1], "key", "") == "gamma"
                       else x),
      variables["params"])
  out = module.apply({**variables, "params": params}, target, source, train=False)

  bn = 1.0 / np.sqrt(1.0 + 1e-5)
  t, s = np.asarray(target[0]), np.asarray(source[0])
  q = np.maximum(t[::2, ::2] * bn, 0).reshape(-1, c)  # 2x3 query grid
  pooled = s.reshape(2, 2, 3, 2, c).max(axis=(1, 3))
  kv = np.maximum(pooled * bn, 0).reshape(-1, c)
  logits = q @ kv.T / np.sqrt(c)
  co = np.exp(logits - logits.max(axis=1, keepdims=True))
  co /= co.sum(axis=1, keepdims=True)
  attended = (co @ kv).reshape(2, 3, c)
  expected = 2.0 * attended.repeat(2, axis=0).repeat(2, axis=1)  # nearest upsampling
  np.testing.assert_allclose(np.asarray(out[0]), expected, rtol=1e-5, atol=1e-6)


def test_mtinet_structure_and_all_scale_outputs():
  tasks = ("semseg", "depth")
  model = MTINet(tasks, {"semseg": 40, "depth": 1}, TinyBackbone(), initial_blocks=1,
                 all_scale_outputs=True)
  images = jnp.zeros((1, *SIZE, 3))
  variables = jax.eval_shape(lambda x: model.init(key(0), x), images)
  params = variables["params"]
  # FPMs hand features to the next finer scale: none at the finest scale.
  assert sorted(k for k in params if k.startswith("fpm")) == [
      "fpm_scale1", "fpm_scale2", "fpm_scale3"]
  assert sorted(k for k in params if k.startswith("distillation")) == [
      f"distillation_scale{i}" for i in range(4)]
  for scale, channels in enumerate(BRANCH_CHANNELS):
    first = params[f"scale{scale}_initial_depth"]["block0"]["conv1"]["kernel"]
    # Input: the scale's backbone features plus, below the coarsest scale, the propagated ones.
    extra = BRANCH_CHANNELS[scale + 1] if scale < 3 else 0
    assert first.shape == (3, 3, channels + extra, channels)
    assert sorted(params[f"distillation_scale{scale}"]) == ["sa_depth_to_semseg",
                                                           "sa_semseg_to_depth"]
  assert params["head_semseg"]["conv"]["kernel"].shape[2] == sum(BRANCH_CHANNELS)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert set(out) == {"initial", "initial_scale1", "initial_scale2", "initial_scale3", "final"}
  assert all(o["semseg"].shape == (1, *SIZE, 40) for o in out.values())


def test_feature_propagation_adds_refinement_to_each_task():
  tasks = ("semseg", "depth", "sal")
  features = _features(tasks, channels=8, size=(4, 4))
  fpm = FeaturePropagation(tasks, se_reduction=4)
  variables = jax.jit(lambda f: fpm.init(key(0), f, train=False))(features)
  out = jax.jit(lambda v, f: fpm.apply(v, f, train=False))(variables, features)
  assert set(out) == set(tasks)
  assert sorted(k for k in variables["params"] if k.startswith("se_")) == [
      f"se_{t}" for t in sorted(tasks)]
  # Every task adds its own squeeze-excitation of one shared map: per example and channel,
  # out_t - f_t are the same map up to a positive scale.
  diffs = {t: np.asarray(out[t] - features[t]) for t in tasks}
  for a, b in (("semseg", "depth"), ("semseg", "sal")):
    x, y = diffs[a].transpose(0, 3, 1, 2).reshape(16, -1), diffs[b].transpose(0, 3, 1, 2).reshape(
        16, -1)
    scale = np.sum(x * y, axis=1) / np.sum(y * y, axis=1)
    assert np.all(scale > 0)
    np.testing.assert_allclose(x, scale[:, None] * y, rtol=1e-4, atol=1e-5)


def test_stl_networks_are_independent():
  config = row_config("nyud", "stl")
  model = build_tiny(config)
  assert isinstance(model, STLNet)
  batch = fake_batch("nyud", ("semseg", "depth"))
  variables = jax.jit(lambda x: model.init(key(0), x))(batch["image"])

  def semseg_loss(params):
    out = model.apply({**variables, "params": params}, batch["image"])
    return losses.task_loss("semseg", out["final"]["semseg"], batch["semseg"])

  grads = jax.jit(jax.grad(semseg_loss))(variables["params"])
  assert all(not np.any(g) for g in jax.tree_util.tree_leaves(grads["networks_depth"]))
  assert any(np.any(g) for g in jax.tree_util.tree_leaves(grads["networks_semseg"]))


def test_padnet_is_built_as_the_survey_builds_it():
  """HRNet fuse layer, 2-Bottleneck initial modules to 256 channels, 2-Bottleneck + conv heads."""
  tasks = ("semseg", "depth")
  model = PADNet(tasks, {"semseg": 40, "depth": 1}, TinyBackbone(), channels=256)
  images = jnp.zeros((1, *SIZE, 3))
  params = jax.eval_shape(lambda x: model.init(key(0), x), images)["params"]
  shared = sum(BRANCH_CHANNELS)
  assert sorted(params) == ["backbone", "distillation", "fuse", "head_depth", "head_semseg",
                            "initial_depth", "initial_semseg"]
  # Fuse: 1x1 conv with bias keeping the concatenated channels, then BN.
  assert params["fuse"]["conv"]["kernel"].shape == (1, 1, shared, shared)
  assert params["fuse"]["conv"]["bias"].shape == (shared,) and "bn" in params["fuse"]
  for t, outputs in (("semseg", 40), ("depth", 1)):
    for module in (f"initial_{t}", f"head_{t}"):
      blocks = params[module]
      assert sorted(blocks) == ["block0", "block1", "predict"]
      first = blocks["block0"]
      assert first["conv1"]["kernel"].shape[2:] == (
          (shared if module.startswith("initial") else 256), 64)
      assert first["conv3"]["kernel"].shape == (1, 1, 64, 256)
      # A projection only where the channels change (270 -> 256 into the initial module).
      assert ("downsample_conv" in first) == module.startswith("initial")
      assert "downsample_conv" not in blocks["block1"]
      assert blocks["predict"]["kernel"].shape == (1, 1, 256, outputs)
      assert blocks["predict"]["bias"].shape == (outputs,)
  assert sorted(params["distillation"]) == ["sa_depth_to_semseg", "sa_semseg_to_depth"]
  out = jax.eval_shape(lambda x: model.apply(model.init(key(0), x), x), images)
  assert set(out) == {"initial", "final"}
  assert out["final"]["semseg"].shape == (1, *SIZE, 40)


def test_fpm_groups_channels_as_the_survey_code_reshapes_them():
  """softmax over N consecutive channels of the concatenation (torch `view(B, C, N, H, W)`)."""
  tasks = ("semseg", "depth", "sal")
  n, c = len(tasks), 4
  features = _features(tasks, channels=c, size=(3, 3), seed=3)
  fpm = FeaturePropagation(tasks, se_reduction=2)
  variables = jax.jit(lambda f: fpm.init(key(0), f, train=False))(features)
  _, state = fpm.apply(variables, features, train=False, capture_intermediates=True,
                       mutable=["intermediates"])
  g = np.asarray(state["intermediates"]["nonlinear_out"]["__call__"][0])  # [B, h, w, N*C]
  concat = np.concatenate([np.asarray(features[t]) for t in tasks], axis=-1)
  # The survey: view the channels as [C, N] (channel k -> row k // N, column k % N), softmax on N.
  grouped = g.reshape(*g.shape[:-1], c, n)
  mask = np.exp(grouped - grouped.max(-1, keepdims=True))
  mask /= mask.sum(-1, keepdims=True)
  expected_shared_input = (mask * concat.reshape(*concat.shape[:-1], c, n)).reshape(concat.shape)
  # The rest of the FPM (reduction block, per-task SE) on that attention-weighted input.
  params, stats = variables["params"], variables["batch_stats"]
  shared = BasicBlock(c).apply({"params": params["reduce"], "batch_stats": stats["reduce"]},
                               jnp.asarray(expected_shared_input), train=False)
  out = fpm.apply(variables, features, train=False)
  for t in tasks:
    expected = SqueezeExcitation(2).apply({"params": params[f"se_{t}"]}, shared) + features[t]
    np.testing.assert_allclose(out[t], expected, rtol=1e-5, atol=1e-5)
