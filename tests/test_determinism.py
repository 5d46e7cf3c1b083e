"""config.deterministic -> XLA's deterministic GPU options; no select-and-scatter in a train step.

Whether the options make GPU reruns agree is measured on a GPU (`benchmarks/gpu_check.py --groups
determinism`); here: the options are ones this XLA knows, they follow the config, and no model's
gradient contains the one operation XLA cannot compile deterministically (select-and-scatter,
`max_pool`'s gradient). That a run compiles every jitted function with them is
tests/test_train.py::test_a_deterministic_run_compiles_every_jit_with_the_options.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, nyud_ifbC
from iterfuse_jax import determinism
from iterfuse_jax.models import build_model
from iterfuse_jax.models.layers import max_pool_first


def _pool(x, window):
  return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def test_compiler_options_follow_the_config():
  config = default.get_config()
  assert config.deterministic is False
  assert determinism.compiler_options(config) is None
  config.deterministic = True
  assert determinism.compiler_options(config) == {"xla_gpu_deterministic_ops": True}
  # A workdir's config.json from before the option: XLA's defaults, as that run had.
  old = ml_collections.ConfigDict({"seed": 0})
  assert determinism.compiler_options(old) is None
  with pytest.raises(ValueError, match=r"config.deterministic must be True or False, got 'yes'"):
    determinism.compiler_options(ml_collections.ConfigDict({"deterministic": "yes"}))


def test_this_xla_knows_the_deterministic_options():
  # A flag that a jaxlib renames or drops is an error at compile time, on a CPU as well.
  f = jax.jit(lambda x: jnp.sum(x * x), compiler_options=determinism.DETERMINISTIC_GPU_OPTIONS)
  assert float(f(jnp.arange(4.0))) == 14.0
  with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
    jax.jit(lambda x: x, compiler_options={"xla_no_such_option_here": True})(1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,window", [((2, 8, 12, 3), 2), ((1, 7, 10, 4), 3)])
def test_max_pool_first_is_max_pool_in_value_and_gradient(shape, window, dtype):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  # Ties, as after a ReLU: about half the inputs are 0, and one tile is all zeros.
  x = jax.nn.relu(x).at[:, :window, :window].set(0.0).astype(dtype)
  weights = jax.random.normal(jax.random.key(1), (shape[3],), dtype)

  def loss(pool, x):
    return jnp.sum(jnp.sin(pool(x, window).astype(jnp.float32)) * weights)

  got, want = max_pool_first(x, window), _pool(x, window)
  assert got.dtype == x.dtype and got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  grad = jax.grad(loss, argnums=1)
  got_grad, want_grad = grad(max_pool_first, x), grad(_pool, x)
  np.testing.assert_array_equal(np.asarray(got_grad, np.float32),
                                np.asarray(want_grad, np.float32))
  # The all-zero tile: its whole gradient on its first element, as PyTorch's max_pool2d does.
  tile = np.asarray(got_grad[0, :window, :window], np.float32)
  assert np.all(tile.reshape(-1, shape[3])[1:] == 0) and np.all(tile[0, 0] != 0)


def test_max_pool_first_rejects_an_input_smaller_than_the_window():
  with pytest.raises(ValueError, match=r"a 3x3 window does not fit the input's 2x5 grid"):
    max_pool_first(jnp.zeros((1, 2, 5, 1)), 3)


def _lowered_gradient(f, *args) -> str:
  return jax.jit(jax.grad(f)).lower(*args).as_text()


def test_no_select_and_scatter_in_the_gradient_of_max_pool_first():
  x = jnp.ones((1, 4, 4, 2))
  # The check can see it: flax's max_pool has it.
  assert "select_and_scatter" in _lowered_gradient(lambda x: jnp.sum(_pool(x, 2)), x)
  assert "select_and_scatter" not in _lowered_gradient(lambda x: jnp.sum(max_pool_first(x, 2)),
                                                       x)


def test_no_select_and_scatter_in_the_iterfuse_train_gradient():
  """The real HRNet18, TPIM and heads (the tiny-backbone baselines: test_baselines)."""
  config = nyud_ifbC.get_config()
  config.model.task_channels = 8
  model = build_model(config)
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

  def loss(params):
    out, _ = model.apply({**variables, "params": params}, images, train=True,
                         mutable=["batch_stats"])
    return sum(jnp.sum(v) for level in out.values() for v in level.values())

  assert "select_and_scatter" not in _lowered_gradient(loss, variables["params"])
