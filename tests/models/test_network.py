"""The IterFuse network, CIB and TPIM: shapes, structure, gradients, compilation, bad input."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from iterfuse_jax import models
from iterfuse_jax.models import cross_task

SIZE = (64, 96)  # stride-32 friendly; 1/4 features are 16x24, pooled 8x12 = 96 positions.


def tiny_config(dataset="nyud", tasks=("semseg", "depth"), **model_overrides):
  # The backbone with a quarter of W18-Small-v2's blocks and its four branches: these tests are
  # about what follows the backbone (tests/models/test_hrnet.py checks the published ones), and
  # it compiles in about half the time.
  config = ml_collections.ConfigDict({
      "dataset": {"name": dataset, "tasks": tasks},
      "model": {
          "name": "iterfuse", "backbone": "w18_tiny", "fuse_upsample": "bilinear",
          "task_channels": 16, "initial_blocks": 1, "dtype": "float32",
          "tpim": {"use_ifb": True, "variant": "C", "n_iter": 3, "alpha_init": 0.3, "scale": 2,
                   "qk_channels": 0, "ifb_impl": "materialized", "ifb_products": "model",
                   "ifb_gradient": "stacked"},
      },
  })
  for key, value in model_overrides.items():
    if key in config.model.tpim:
      config.model.tpim[key] = value
    else:
      config.model[key] = value
  return config


def _images(batch=2, size=SIZE, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, *size, 3), jnp.float32)


@pytest.fixture(scope="module")
def nyud_model_and_variables():
  model = models.build_model(tiny_config())
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(_images())
  return model, variables


@pytest.mark.parametrize("dataset, tasks, channels", [
    ("nyud", ("semseg", "depth"), {"semseg": 40, "depth": 1}),
    ("pascal", ("semseg", "human_parts", "sal"), {"semseg": 21, "human_parts": 7, "sal": 1}),
])
def test_forward_shapes_with_deep_supervision(dataset, tasks, channels):
  model = models.build_model(tiny_config(dataset, tasks))
  images = _images(batch=1)
  out, variables = jax.eval_shape(
      lambda x: (model.apply(model.init(jax.random.key(0), x), x), model.init(jax.random.key(0), x)),
      images)
  assert set(out) == {"initial", "final"}
  for stage in ("initial", "final"):
    assert set(out[stage]) == set(tasks)
    for task in tasks:
      assert out[stage][task].shape == (1, *SIZE, channels[task])
      assert out[stage][task].dtype == jnp.float32
  # N(N-1) CIBs, none on the diagonal.
  cibs = sorted(variables["params"]["distillation"])
  expected = sorted(f"cib_{s}_to_{t}" for s in tasks for t in tasks if s != t)
  assert cibs == expected


def test_gradients_reach_every_parameter(nyud_model_and_variables):
  model, variables = nyud_model_and_variables
  images = _images()

  def loss(params):
    out = model.apply({**variables, "params": params}, images, train=False)
    return sum(jnp.sum(jnp.sin(x)) for stage in out.values() for x in stage.values())

  grads = jax.jit(jax.grad(loss))(variables["params"])
  flat = flax.traverse_util.flatten_dict(grads, sep="/")
  dead = [name for name, g in flat.items() if not np.all(np.isfinite(g)) or np.abs(g).max() == 0]
  assert not dead, f"parameters without gradient: {dead}"
  alphas = [name for name in flat if name.endswith("alpha")]
  assert len(alphas) == 2


def test_train_mode_updates_batch_stats_and_jit_compiles_once_per_shape(
    nyud_model_and_variables):
  model, variables = nyud_model_and_variables

  @jax.jit
  def train_forward(variables, images):
    return model.apply(variables, images, train=True, mutable=["batch_stats"])

  _, updates = train_forward(variables, _images(seed=1))
  _, updates2 = train_forward(variables, _images(seed=2))
  assert train_forward._cache_size() == 1
  before = flax.traverse_util.flatten_dict(variables["batch_stats"])
  after = flax.traverse_util.flatten_dict(updates["batch_stats"])
  assert before.keys() == after.keys()
  assert any(not np.allclose(before[k], after[k]) for k in before)
  train_forward(variables, _images(batch=2, size=(32, 64)))
  assert train_forward._cache_size() == 2


def test_alpha_initialised_per_cib(nyud_model_and_variables):
  _, variables = nyud_model_and_variables
  for name in ("cib_semseg_to_depth", "cib_depth_to_semseg"):
    assert float(variables["params"]["distillation"][name]["alpha"]) == pytest.approx(0.3)


def test_tpim_is_identity_plus_sum_of_cibs():
  tasks = ("a", "b", "c")
  tpim = cross_task.TaskPairInteractionModule(tasks=tasks, channels=8, n_iter=2)
  keys = jax.random.split(jax.random.key(1), 3)
  feats = {t: jax.random.normal(k, (1, 8, 8, 8)) for t, k in zip(tasks, keys)}
  variables = tpim.init(jax.random.key(0), feats, train=False)
  out = tpim.apply(variables, feats, train=False)
  cib = cross_task.CrossTaskInteractionBlock(channels=8, n_iter=2)
  for t in tasks:
    want = feats[t]
    for s in tasks:
      if s != t:
        sub = {col: tree[f"cib_{s}_to_{t}"] for col, tree in variables.items()}
        want = want + cib.apply(sub, feats[s], feats[t], train=False)
    np.testing.assert_allclose(np.asarray(out[t]), np.asarray(want), rtol=1e-5, atol=1e-5)


def _cib_parts(block, variables, f_s, f_t):
  """Runs a CIB and returns its output, sown affinity and values."""
  out, state = block.apply(variables, f_s, f_t, train=False, mutable=["intermediates"])
  inter = state["intermediates"]
  return out, inter["affinity"][0], inter["values"][0]


def test_cib_combines_self_attention_and_fused_global_attention():
  f_s = jax.random.normal(jax.random.key(0), (2, 8, 12, 6))
  f_t = jax.random.normal(jax.random.key(1), (2, 8, 12, 6))
  block = cross_task.CrossTaskInteractionBlock(channels=6, n_iter=4, variant="C", scale=2)
  variables = block.init(jax.random.key(2), f_s, f_t, train=False)
  out, co, v = _cib_parts(block, variables, f_s, f_t)
  assert co.shape == (2, 24, 24) and v.shape == (2, 24, 6)
  np.testing.assert_allclose(np.asarray(co.sum(-1)), 1.0, rtol=1e-5)
  # Rebuild the output from its parts: self-attention + up(IFB(V, Co)).
  self_att = cross_task.SpatialSelfAttention(6).apply(
      {"params": variables["params"]["self_attention"]}, f_s)
  fused = models.iterative_fusion(co, v, jnp.float32(0.3), 4, "C").reshape(2, 4, 6, 6)
  up = jax.image.resize(fused, (2, 8, 12, 6), "bilinear")
  np.testing.assert_allclose(np.asarray(out), np.asarray(self_att + up), rtol=1e-4, atol=1e-5)


def test_cib_without_ifb_is_one_plain_attention_product():
  f_s = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  f_t = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
  plain = cross_task.CrossTaskInteractionBlock(channels=4, use_ifb=False)
  variables = plain.init(jax.random.key(2), f_s, f_t, train=False)
  assert "alpha" not in variables["params"]
  out, co, v = _cib_parts(plain, variables, f_s, f_t)
  self_att = cross_task.SpatialSelfAttention(4).apply(
      {"params": variables["params"]["self_attention"]}, f_s)
  up = jax.image.resize((co @ v).reshape(1, 4, 4, 4), (1, 8, 8, 4), "bilinear")
  np.testing.assert_allclose(np.asarray(out), np.asarray(self_att + up), rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  config = tiny_config(dtype="bfloat16")
  model = models.build_model(config)
  images = _images(batch=1)
  # Jitted: op-by-op, the two networks took a minute on a 2-core CPU.
  variables = jax.jit(model.init)(jax.random.key(0), images)
  leaves = jax.tree_util.tree_leaves(variables["params"])
  assert all(x.dtype == jnp.float32 for x in leaves)
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  ref_model = models.build_model(tiny_config())
  ref = jax.jit(lambda v, x: ref_model.apply(v, x))(variables, images)
  for task in ("semseg", "depth"):
    assert out["final"][task].dtype == jnp.float32
    a, b = np.asarray(out["final"][task]), np.asarray(ref["final"][task])
    assert np.abs(a - b).max() <= 0.1 * np.abs(b).max() + 1e-3


@pytest.mark.parametrize("overrides, message", [
    (dict(variant="Z"), "unknown IFB variant 'Z'"),
    (dict(n_iter=-3), "n_iter must be a non-negative int"),
    (dict(ifb_impl="magic"), "unknown ifb_impl 'magic'"),
    (dict(ifb_products="half"), "unknown ifb_products 'half'"),
    (dict(ifb_gradient="manual"), "unknown ifb_gradient 'manual'"),
    (dict(ifb_impl="streamed", ifb_products="float32"),
     "ifb_products='float32' applies to the materialized IFB"),
    (dict(dtype="float16"), "unknown model.dtype 'float16'"),
    (dict(name="nonet"), "unknown model.name 'nonet'"),
    (dict(backbone="w99"), "w99"),
])
def test_bad_model_config_raises_when_the_model_is_built(overrides, message):
  # Before anything is traced: the IFB's options raised only once init reached the TPIM, after
  # the backbone had run (44 s on a 2-core CPU).
  with pytest.raises(ValueError, match=message):
    models.build_model(tiny_config(**overrides))


def test_ifb_products_of_a_config_and_of_an_older_run_config():
  assert models.build_model(tiny_config()).distillation.ifb_products == "model"
  # A workdir's config.json from before the option: that run's IFB products were float32.
  old = tiny_config()
  del old.model.tpim["ifb_products"]
  assert models.build_model(old).distillation.ifb_products == "float32"


def test_ifb_gradient_defaults_to_stacked_also_for_an_older_run_config():
  assert models.build_model(tiny_config()).distillation.ifb_gradient == "stacked"
  old = tiny_config()
  del old.model.tpim["ifb_gradient"]  # the same values either way: the faster one
  assert models.build_model(old).distillation.ifb_gradient == "stacked"
  assert models.build_model(tiny_config(ifb_gradient="autodiff")).distillation.ifb_gradient == (
      "autodiff")


@pytest.mark.parametrize("dataset, tasks, message", [
    ("nyud", ("semseg", "albedo"), "unknown task 'albedo'"),
    ("nyud", ("semseg", "sal"), "task 'sal' has no labels in dataset 'nyud'"),
    ("cityscapes", ("semseg",), "unknown dataset 'cityscapes'"),
])
def test_bad_tasks_raise(dataset, tasks, message):
  with pytest.raises(ValueError, match=message):
    models.build_model(tiny_config(dataset, tasks))


@pytest.mark.parametrize("shape, message", [
    ((2, 64, 64), r"images must be \[B, H, W, 3\]"),
    ((2, 64, 64, 4), r"images must be \[B, H, W, 3\]"),
])
def test_bad_images_raise(nyud_model_and_variables, shape, message):
  model, variables = nyud_model_and_variables
  with pytest.raises(ValueError, match=message):
    model.apply(variables, jnp.zeros(shape))


def test_cib_rejects_wrong_channel_count():
  block = cross_task.CrossTaskInteractionBlock(channels=6)
  with pytest.raises(ValueError, match=r"f_s must be \[B, H, W, 6\]"):
    block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 5)), jnp.zeros((1, 8, 8, 6)), train=False)
