"""HRNet backbone: parity with timm (eval and train mode, nearest and bilinear fuse, W18-Small-v2
and W18, classifier logits), tensor coverage, shapes at odd sizes, dtypes and bad arguments."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from iterfuse_jax.models import hrnet_weights
from iterfuse_jax.models.hrnet import HRNet, HRNetClassifier
from tests.models import timm_hrnet

TOL = 1e-4  # max |diff| / max |ref|
CHANNELS = [18, 36, 72, 144]


def _images(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape, 3).astype(np.float32)


@pytest.fixture(scope="module")
def small_v2():
  """(timm model, converted backbone variables) for a random HRNet-W18-Small-v2."""
  model = timm_hrnet.random_timm_hrnet("w18_small_v2", seed=0)
  state = timm_hrnet.numpy_state_dict(model)
  return model, state, hrnet_weights.torch_state_dict_to_flax(state, "w18_small_v2")


@pytest.fixture(scope="module")
def small_v2_nearest_apply():
  return jax.jit(HRNet("w18_small_v2", "nearest").apply)


@pytest.fixture(scope="module")
def small_v2_bilinear_apply():
  return jax.jit(HRNet("w18_small_v2", "bilinear").apply)


def _check_branches(outputs, reference, size):
  assert len(outputs) == 4
  for k, (out, ref) in enumerate(zip(outputs, reference)):
    stride = 4 * 2**k
    expected_hw = tuple(-(-s // stride) for s in size)
    assert out.shape[1:] == (*expected_hw, CHANNELS[k])
    assert out.shape == ref.shape
    assert out.dtype == jnp.float32
    err = timm_hrnet.relative_error(out, ref)
    assert err < TOL, f"branch {k}: relative error {err}"


def test_small_v2_matches_timm_eval_nearest(small_v2, small_v2_nearest_apply):
  model, _, variables = small_v2
  images = _images((2, 64, 96))
  outputs = small_v2_nearest_apply(variables, images)
  _check_branches(outputs, timm_hrnet.timm_branches(model, images), (64, 96))


def test_small_v2_matches_timm_train_mode_and_updates_stats(small_v2):
  model, state, variables = small_v2
  images = _images((2, 64, 64), seed=1)
  # timm's train-mode forward changes its running statistics: use a copy.
  reference = timm_hrnet.timm_branches(copy.deepcopy(model), images, train=True)
  outputs, updates = jax.jit(
      lambda v, x: HRNet("w18_small_v2", "nearest").apply(v, x, train=True,
                                                         mutable=["batch_stats"]))(variables,
                                                                                   images)
  _check_branches(outputs, reference, (64, 64))
  # Flax momentum 0.99 = PyTorch momentum 0.01 (the reference HRNet's BN momentum).
  torch = timm_hrnet.torch
  with torch.no_grad():
    stem = model.conv1(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  expected_mean = 0.99 * state["bn1.running_mean"] + 0.01 * stem.mean(axis=(0, 2, 3))
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], expected_mean,
                             rtol=1e-4, atol=1e-5)


def test_bilinear_fuse_matches_exact_size_reference_at_odd_size(small_v2,
                                                                small_v2_bilinear_apply):
  """72x100 is not a multiple of 32: timm's scale-factor upsampling cannot run there, the
  segmentation codebases' exact-size bilinear fuse (which we follow) can."""
  model, _, variables = small_v2
  reference_model = copy.deepcopy(model)
  timm_hrnet.use_exact_size_bilinear_fuse(reference_model)
  images = _images((1, 72, 100), seed=2)
  outputs = small_v2_bilinear_apply(variables, images)
  assert [o.shape[1:3] for o in outputs] == [(18, 25), (9, 13), (5, 7), (3, 4)]
  _check_branches(outputs, timm_hrnet.timm_branches(reference_model, images), (72, 100))


def test_nearest_fuse_runs_at_odd_size_and_differs_from_bilinear(
    small_v2, small_v2_nearest_apply, small_v2_bilinear_apply):
  _, _, variables = small_v2
  images = _images((1, 72, 100), seed=2)
  nearest = small_v2_nearest_apply(variables, images)
  assert [o.shape[1:] for o in nearest] == [(18, 25, 18), (9, 13, 36), (5, 7, 72), (3, 4, 144)]
  bilinear = small_v2_bilinear_apply(variables, images)
  assert all(np.isfinite(np.asarray(o)).all() for o in nearest)
  for k in range(4):  # every branch has seen upsampled lower branches by now
    assert timm_hrnet.relative_error(nearest[k], bilinear[k]) > 1e-3


def test_classifier_logits_match_timm(small_v2):
  model, state, _ = small_v2
  variables = hrnet_weights.torch_state_dict_to_flax(state, "w18_small_v2",
                                                     include_classifier=True)
  images = _images((1, 64, 64), seed=3)
  logits = jax.jit(HRNetClassifier("w18_small_v2").apply)(variables, images)
  reference = timm_hrnet.timm_logits(model, images)
  assert logits.shape == (1, 1000)
  assert timm_hrnet.relative_error(logits, reference) < TOL
  np.testing.assert_array_equal(np.argsort(-np.asarray(logits[0]))[:5],
                                np.argsort(-reference[0])[:5])


@pytest.mark.parametrize("variant", ["w18_small_v2", "w18"])
def test_every_backbone_tensor_has_exactly_one_home(variant):
  model = timm_hrnet.random_timm_hrnet(variant, seed=4)
  timm_keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
  for with_head in (False, True):
    abstract = hrnet_weights.abstract_variables(variant, include_classifier=with_head)
    homes = [hrnet_weights.flax_to_torch_key(c, path) for c in hrnet_weights.COLLECTIONS
             for path in traverse_util.flatten_dict(abstract[c])]
    assert len(homes) == len(set(homes)), "two Flax leaves read the same tensor"
    expected = {k for k in timm_keys if with_head or not hrnet_weights.is_classifier_key(k)}
    assert set(homes) == expected


@pytest.mark.slow  # ~20 s on 2 cores: the full W18 compiles slowly
def test_w18_matches_timm():
  model = timm_hrnet.random_timm_hrnet("w18", seed=5)
  variables = hrnet_weights.torch_state_dict_to_flax(timm_hrnet.numpy_state_dict(model), "w18")
  images = _images((1, 32, 64), seed=5)
  outputs = jax.jit(HRNet("w18", "nearest").apply)(variables, images)
  _check_branches(outputs, timm_hrnet.timm_branches(model, images), (32, 64))


def test_bfloat16_compute_float32_params():
  model = HRNet("w18_small_v2", dtype=jnp.bfloat16)
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  outputs = jax.eval_shape(lambda v: model.apply(v, images), variables)
  assert [o.dtype for o in outputs] == [jnp.dtype(jnp.bfloat16)] * 4
  assert [o.shape for o in outputs] == [(1, 16, 16, 18), (1, 8, 8, 36), (1, 4, 4, 72),
                                        (1, 2, 2, 144)]


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"'w32'.*w18_small_v2"):
    HRNet(variant="w32")
  with pytest.raises(ValueError, match=r"'bicubic'.*nearest"):
    HRNet(fuse_upsample="bicubic")
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    jax.eval_shape(lambda: HRNet().init(jax.random.key(0), jnp.zeros((1, 3, 64, 64))))


def test_tiny_variant_has_the_branches_of_small_v2_with_a_quarter_of_its_blocks():
  """w18_tiny (configs/demo.py:tiny, the tests) is a drop-in backbone: same four branches."""
  images = jnp.zeros((1, 64, 96, 3))

  def shapes(variant):
    variables = jax.eval_shape(lambda: HRNet(variant).init(jax.random.key(0), images, train=False))
    outputs = jax.eval_shape(lambda v: HRNet(variant).apply(v, images, train=False), variables)
    blocks = set()
    for path in traverse_util.flatten_dict(variables["params"]):
      ends = [i for i, part in enumerate(path) if "block" in part]
      if ends:
        blocks.add(path[:ends[0] + 1])
    return [o.shape for o in outputs], len(blocks)

  tiny_outputs, tiny_blocks = shapes("w18_tiny")
  small_outputs, small_blocks = shapes("w18_small_v2")
  assert tiny_outputs == small_outputs == [(1, 16, 24, 18), (1, 8, 12, 36), (1, 4, 6, 72),
                                           (1, 2, 3, 144)]
  # Stage 1 (Bottlenecks) and stages 2-4: 1 + 2 + 3 + 4 blocks against 2 + 1*4 + 3*6 + 2*8.
  assert (tiny_blocks, small_blocks) == (10, 40)
