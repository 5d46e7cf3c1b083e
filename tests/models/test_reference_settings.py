"""The survey code's settings in our modules: Q/K width, BatchNorm momenta and semantics, init."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import nyud_ifbC, pascal_ifbC
from iterfuse_jax.models import build_model, initialization, layers
from iterfuse_jax.models.cross_task import CrossTaskInteractionBlock

torch = pytest.importorskip("torch")


def _flat(tree):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("config_module", [nyud_ifbC, pascal_ifbC])
def test_default_qk_width_is_half_the_task_channels(config_module):
  config = config_module.get_config()
  assert config.model.tpim.qk_channels == 0  # 0 = C // 2
  params = jax.eval_shape(
      lambda x: build_model(config).init(jax.random.key(0), x), jnp.zeros((1, 64, 64, 3))
  )["params"]
  c = config.model.task_channels
  for name, block in params["distillation"].items():
    assert block["query"]["conv"]["kernel"].shape == (1, 1, c, c // 2), name
    assert block["key"]["conv"]["kernel"].shape == (1, 1, c, c // 2), name
    assert block["value"]["conv"]["kernel"].shape == (1, 1, c, c), name  # V keeps C
  # An explicit width still wins.
  block = CrossTaskInteractionBlock(channels=8, qk_channels=3, n_iter=1)
  f = jnp.zeros((1, 4, 4, 8))
  p = jax.eval_shape(lambda: block.init(jax.random.key(0), f, f, train=False))["params"]
  assert p["query"]["conv"]["kernel"].shape == (1, 1, 8, 3)


def _bn_momenta(model, images):
  """Every BatchNorm module's momentum, by module path (from a trace of the module tree)."""
  momenta = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
      momenta["/".join(context.module.path)] = context.module.momentum
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(interceptor):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return momenta


@pytest.mark.parametrize("name", ["iterfuse", "padnet", "mtinet", "mtl"])
def test_batch_norm_momenta_per_module(name):
  """HRNet: PyTorch momentum 0.01 (flax 0.99); everything after it: PyTorch's 0.1 (flax 0.9)."""
  config = nyud_ifbC.get_config()
  config.unlock()
  config.model.name = name
  config.model.task_channels = 16
  momenta = _bn_momenta(build_model(config), jnp.zeros((1, 64, 64, 3)))
  backbone = {k: m for k, m in momenta.items() if k.startswith("backbone/")}
  rest = {k: m for k, m in momenta.items() if not k.startswith("backbone/")}
  assert len(backbone) > 100 and set(backbone.values()) == {0.99}
  assert rest and set(rest.values()) == {0.9}, rest


def test_batch_norm_matches_pytorch_including_running_statistics():
  """Train-mode output and the running-statistics update (unbiased variance) of nn.BatchNorm2d."""
  rng = np.random.default_rng(0)
  x = rng.normal(1.5, 2.0, size=(2, 3, 3, 5)).astype(np.float32)  # only 18 values per channel
  bn = layers.BatchNorm(momentum=0.9)
  variables = bn.init(jax.random.key(0), x)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}
  y, updates = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                        mutable=["batch_stats"])
  reference = torch.nn.BatchNorm2d(5, momentum=0.1, eps=1e-5).train()
  with torch.no_grad():
    reference.weight.copy_(torch.from_numpy(np.array(params["scale"])))
    reference.bias.copy_(torch.from_numpy(np.array(params["bias"])))
    expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], reference.running_mean.numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], reference.running_var.numpy(),
                             rtol=1e-5, atol=1e-6)
  # Evaluation normalises with the running statistics.
  eval_bn = layers.BatchNorm(use_running_average=True)
  y_eval = eval_bn.apply({"params": params, "batch_stats": updates["batch_stats"]}, x)
  with torch.no_grad():
    expected_eval = reference.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(y_eval, expected_eval.permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_pytorch_default_initialisation_statistics(kind):
  """Our redraw of a conv / dense layer has the distribution of PyTorch's default init."""
  torch.manual_seed(0)
  if kind == "conv":
    module = torch.nn.Conv2d(96, 128, 3)
    kernel_shape, fan_in = (3, 3, 96, 128), 96 * 9
    theirs_w = module.weight.detach().numpy().transpose(2, 3, 1, 0)
  else:
    module = torch.nn.Linear(512, 256)
    kernel_shape, fan_in = (512, 256), 512
    theirs_w = module.weight.detach().numpy().T
  theirs_b = module.bias.detach().numpy()
  params = {"layer": {"kernel": jnp.zeros(kernel_shape), "bias": jnp.zeros(kernel_shape[-1])}}
  ours = initialization.pytorch_default_init(params, jax.random.key(1))["layer"]
  ours_w, ours_b = np.asarray(ours["kernel"]), np.asarray(ours["bias"])
  bound = 1 / np.sqrt(fan_in)
  assert initialization.pytorch_uniform_bound(kernel_shape) == pytest.approx(bound)
  for mine, reference in ((ours_w, theirs_w), (ours_b, theirs_b)):
    assert mine.shape == reference.shape
    assert np.abs(mine).max() <= bound and np.abs(reference).max() <= bound
    # The same distribution: two-sample Kolmogorov-Smirnov, and uniform(-b, b)'s std b / sqrt(3).
    assert stats.ks_2samp(mine.ravel(), reference.ravel()).pvalue > 1e-3
  assert np.std(ours_w) == pytest.approx(bound / np.sqrt(3), rel=0.02)
  assert np.std(theirs_w) == pytest.approx(bound / np.sqrt(3), rel=0.02)


def test_pytorch_init_leaves_backbones_and_batch_norm_alone():
  config = pascal_ifbC.get_config()
  config.unlock()
  config.model.task_channels = 16
  config.model.backbone = "w18_tiny"  # left alone like any other: a quarter of the compile
  model = build_model(config)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(jnp.zeros((1, 32, 32, 3)))
  params = variables["params"]
  redrawn = initialization.initialize_params(params, jax.random.key(1), "pytorch")
  before, after = _flat(params), _flat(redrawn)
  assert before.keys() == after.keys()
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert not any(k.startswith("backbone/") for k in changed)
  for k in before:
    is_layer = k.endswith("/kernel") or (k.endswith("/bias") and k[:-4] + "kernel" in before)
    assert (k in changed) == (is_layer and not k.startswith("backbone/")), k
  for k in changed:
    bound = initialization.pytorch_uniform_bound(before[k.rsplit("/", 1)[0] + "/kernel"].shape)
    assert np.abs(after[k]).max() <= bound
  assert initialization.initialize_params(params, jax.random.key(1), "flax") is params
  # Deterministic: the same key gives the same weights.
  again = _flat(initialization.initialize_params(params, jax.random.key(1), "pytorch"))
  assert all(np.array_equal(again[k], after[k]) for k in after)
  with pytest.raises(ValueError, match="unknown model.init 'torch'"):
    initialization.initialize_params(params, jax.random.key(1), "torch")


def test_paper_configs_use_pytorch_initialisation():
  from configs import default  # pylint: disable=g-import-not-at-top
  for dataset in ("nyud", "pascal"):
    assert default.get_config(dataset).model.init == "pytorch"
