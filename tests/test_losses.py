"""Losses against hand-computed values: ignore labels, invalid depth, balanced BCE, the total."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_ignores_255():
  logits = np.array([[[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
                      [[0.5, 0.5, 3.0], [9.0, -9.0, 0.0]]]], np.float32)  # [1, 2, 2, 3]
  labels = np.array([[[0, 1], [2, 255]]])
  log_p = _np_log_softmax(logits.astype(np.float64))[0]
  expected = -(log_p[0, 0, 0] + log_p[0, 1, 1] + log_p[1, 0, 2]) / 3
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             expected, rtol=1e-6)


def test_cross_entropy_uniform_logits_is_log_c():
  logits = jnp.zeros((2, 3, 4, 5))
  labels = jnp.array(np.random.default_rng(0).integers(0, 5, (2, 3, 4)))
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), np.log(5), rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_finite_gradient():
  logits = jnp.ones((1, 2, 2, 4))
  labels = jnp.full((1, 2, 2), 255, jnp.uint8)
  value, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0)


def test_cross_entropy_bad_label_is_nan_not_skipped():
  value = losses.cross_entropy(jnp.zeros((1, 1, 2, 3)), jnp.array([[[0, 7]]]))
  assert np.isnan(float(value))


def test_cross_entropy_bfloat16_logits_computed_in_float32():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 6)), jnp.float32)
  labels = jnp.asarray(np.random.default_rng(2).integers(0, 6, (2, 4, 4)))
  value = losses.cross_entropy(logits.astype(jnp.bfloat16), labels)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, losses.cross_entropy(logits, labels), rtol=2e-2)


def test_l1_over_valid_pixels_only():
  pred = np.array([[[1.0, 2.0], [3.0, 100.0]]], np.float32)[..., None]  # [1, 2, 2, 1]
  label = np.array([[[1.5, 0.0], [2.0, 0.0]]], np.float32)  # two valid pixels
  np.testing.assert_allclose(losses.l1(jnp.asarray(pred), jnp.asarray(label)), (0.5 + 1.0) / 2)
  # [B, H, W, 1] labels are accepted too.
  np.testing.assert_allclose(losses.l1(jnp.asarray(pred), jnp.asarray(label[..., None])), 0.75)


def test_l1_no_valid_pixel_is_zero():
  assert float(losses.l1(jnp.ones((2, 3, 3, 1)), jnp.zeros((2, 3, 3)))) == 0.0


def _np_balanced_bce(logits, labels):
  """Straight from the definition, in float64."""
  valid = labels != 255
  pos, neg = valid & (labels >= 0.5), valid & (labels < 0.5)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  w = neg.sum() / valid.sum()
  total = w * -np.log(p[pos]).sum() + (1 - w) * -np.log(1 - p[neg]).sum()
  return total / valid.sum()


def test_balanced_bce_matches_numpy_formula():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (2, 5, 6)).astype(np.float32)
  labels = (rng.uniform(size=(2, 5, 6)) < 0.25).astype(np.float32)
  labels[0, 0, :3] = 255
  got = losses.balanced_bce(jnp.asarray(logits[..., None]), jnp.asarray(labels))
  np.testing.assert_allclose(got, _np_balanced_bce(logits, labels), rtol=1e-5)


def test_balanced_bce_hand_case_and_large_logits():
  # One positive, three negatives: w = 3/4. All logits 0 -> every pixel costs log 2.
  labels = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])
  value = losses.balanced_bce(jnp.zeros((1, 2, 2, 1)), labels)
  np.testing.assert_allclose(value, (0.75 * np.log(2) + 0.25 * 3 * np.log(2)) / 4, rtol=1e-6)
  # Confidently wrong logits stay finite (no log(0)).
  value = losses.balanced_bce(jnp.array([[[[-200.0], [200.0]]]]), jnp.array([[[1.0, 0.0]]]))
  np.testing.assert_allclose(value, (0.5 * 200 + 0.5 * 200) / 2, rtol=1e-6)
  assert float(losses.balanced_bce(jnp.ones((1, 2, 2, 1)), jnp.full((1, 2, 2), 255.0))) == 0.0


def test_multitask_loss_weights_levels_and_parts():
  rng = np.random.default_rng(4)
  batch = {"semseg": jnp.asarray(rng.integers(0, 4, (2, 6, 8))),
           "depth": jnp.asarray(rng.uniform(0.0, 3.0, (2, 6, 8)), jnp.float32)}

  def out():
    return {"semseg": jnp.asarray(rng.normal(size=(2, 6, 8, 4)), jnp.float32),
            "depth": jnp.asarray(rng.normal(size=(2, 6, 8, 1)), jnp.float32)}

  outputs = {"initial": out(), "final": out()}
  weights = {"semseg": 1.0, "depth": 3.0}
  total, parts = jax.jit(losses.multitask_loss, static_argnums=(2,))(
      outputs, batch, ("semseg", "depth"), weights)
  expected = {f"{level}/{task}": (losses.cross_entropy if task == "semseg" else losses.l1)(
      outputs[level][task], batch[task]) for level in ("initial", "final")
              for task in ("semseg", "depth")}
  assert set(parts) == set(expected) | {"total"}
  for key, value in expected.items():
    np.testing.assert_allclose(parts[key], value, rtol=1e-6)
  np.testing.assert_allclose(
      total, sum(weights[k.split("/")[1]] * v for k, v in expected.items()), rtol=1e-6)
  np.testing.assert_allclose(parts["total"], total)

  # Without intermediate predictions (MTL / STL) only the final level counts.
  total_final, parts_final = losses.multitask_loss({"final": outputs["final"]}, batch,
                                                   ("semseg", "depth"), weights)
  assert set(parts_final) == {"final/semseg", "final/depth", "total"}
  np.testing.assert_allclose(
      total_final, expected["final/semseg"] + 3.0 * expected["final/depth"], rtol=1e-6)


def test_multitask_loss_registry_weights_and_resizing():
  # Saliency's registry weight is 5; a low-resolution prediction is resized to the labels.
  # All positive: w = #neg / #valid = 0, so the loss vanishes (the survey's HED-style weighting).
  batch = {"sal": jnp.ones((1, 8, 8))}
  total, parts = losses.multitask_loss({"final": {"sal": jnp.zeros((1, 4, 4, 1))}}, batch,
                                       ("sal",))
  np.testing.assert_allclose(parts["final/sal"], 0.0)  # all positive: w = 0
  assert float(total) == 0.0
  # Half positive: w = 1/2, every pixel costs log 2 -> (1/2) log 2.
  batch = {"sal": jnp.zeros((1, 8, 8)).at[:, :4].set(1.0)}
  total, parts = losses.multitask_loss({"final": {"sal": jnp.zeros((1, 4, 4, 1))}}, batch,
                                       ("sal",))
  np.testing.assert_allclose(parts["final/sal"], 0.5 * np.log(2), rtol=1e-6)
  np.testing.assert_allclose(total, 5 * 0.5 * np.log(2), rtol=1e-6)


def test_multitask_loss_gradient_is_finite_with_everything_ignored():
  batch = {"semseg": jnp.full((1, 4, 4), 255), "depth": jnp.zeros((1, 4, 4))}
  logits = {"semseg": jnp.ones((1, 4, 4, 3)), "depth": jnp.ones((1, 4, 4, 1))}

  def f(x):
    return losses.multitask_loss({"final": x}, batch, ("semseg", "depth"))[0]

  value, grads = jax.value_and_grad(f)(logits)
  assert float(value) == 0.0
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("outputs,batch,match", [
    ({"initial": {}}, {"semseg": jnp.zeros((1, 2, 2))}, "no 'final'"),
    ({"final": {}, "extra": {}}, {"semseg": jnp.zeros((1, 2, 2))}, "unknown output levels"),
    ({"final": {"semseg": jnp.zeros((1, 2, 2, 3))}}, {}, "no labels for tasks"),
    ({"final": {}}, {"semseg": jnp.zeros((1, 2, 2))}, "no prediction for task"),
    ({"final": {"semseg": jnp.zeros((1, 2, 2, 3))}}, {"semseg": jnp.zeros((2, 2, 2))},
     "do not match"),
])
def test_multitask_loss_bad_input(outputs, batch, match):
  with pytest.raises(ValueError, match=match):
    losses.multitask_loss(outputs, batch, ("semseg",))


def test_multitask_loss_missing_weight():
  with pytest.raises(ValueError, match="no loss weight"):
    losses.multitask_loss({"final": {"semseg": jnp.zeros((1, 2, 2, 3))}},
                          {"semseg": jnp.zeros((1, 2, 2))}, ("semseg",), {"depth": 1.0})


# ----------------------------------------------------------------------------- normals and edges


def test_registry_weights_of_the_full_task_sets():
  from iterfuse_jax import tasks
  # The survey's configs: normals 10, edge 50 (semseg 1, depth 1, parts 2, sal 5); edge_w 0.95.
  weights = {t: tasks.get_task(t).loss_weight for t in tasks.TASKS}
  assert weights == {"semseg": 1.0, "depth": 1.0, "human_parts": 2.0, "sal": 5.0,
                     "normals": 10.0, "edge": 50.0}
  assert tasks.get_task("edge").loss_options == {"pos_weight": 0.95}
  assert tasks.FULL_TASKS == {"nyud": ("semseg", "depth", "normals", "edge"),
                              "pascal": ("semseg", "human_parts", "sal", "normals", "edge")}
  from configs import default
  assert default.get_config().loss_weights.to_dict() == weights


def test_normals_l1_normalises_the_prediction_and_skips_invalid_pixels():
  pred = np.array([[[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]],
                    [[0.0, 0.0, -5.0], [7.0, 7.0, 7.0]]]], np.float32)  # [1, 2, 2, 3]
  label = np.array([[[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
                     [[0.0, 0.6, -0.8], [0.0, 0.0, 0.0]]]], np.float32)  # last pixel invalid
  # Pixel 0: unit (1, 0, 0) -> 0. Pixel 1: (0, 1, 0) vs (1, 0, 0) -> 1 + 1 + 0.
  # Pixel 2: (0, 0, -1) vs (0, 0.6, -0.8) -> 0 + 0.6 + 0.2. Mean over 3 pixels x 3 components.
  value = losses.normals_l1(jnp.asarray(pred), jnp.asarray(label))
  np.testing.assert_allclose(value, (0 + 2 + 0.8) / 9, rtol=1e-6)
  assert float(losses.normals_l1(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))) == 0.0
  grad = jax.grad(losses.normals_l1)(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))
  assert np.all(np.isfinite(grad))
  with pytest.raises(ValueError, match=r"labels of shape \(1, 2, 2\) do not match"):
    losses.normals_l1(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2)))


def test_edge_loss_has_the_fixed_positive_weight():
  # One positive, three negatives, logits 0: every pixel costs log 2; w = 0.95, not 3/4.
  labels = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])
  value = losses.task_loss("edge", jnp.zeros((1, 2, 2, 1)), labels)
  np.testing.assert_allclose(value, (0.95 * np.log(2) + 0.05 * 3 * np.log(2)) / 4, rtol=1e-6)
  # The saliency loss on the same batch balances with the fraction of negatives instead.
  np.testing.assert_allclose(losses.task_loss("sal", jnp.zeros((1, 2, 2, 1)), labels),
                             (0.75 * np.log(2) + 0.25 * 3 * np.log(2)) / 4, rtol=1e-6)
  with pytest.raises(ValueError, match=r"pos_weight must be in \[0, 1\]"):
    losses.weighted_bce(jnp.zeros((1, 2, 2, 1)), labels, pos_weight=1.5)


def test_multitask_loss_with_normals_and_edges_uses_registry_weights():
  rng = np.random.default_rng(5)
  normals = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  normals[0, :2] = 0  # invalid rows
  batch = {"normals": jnp.asarray(normals),
           "edge": jnp.asarray((rng.uniform(size=(2, 6, 8)) < 0.1).astype(np.int32))}
  outputs = {"final": {"normals": jnp.asarray(rng.normal(size=(2, 3, 4, 3)), jnp.float32),
                       "edge": jnp.asarray(rng.normal(size=(2, 3, 4, 1)), jnp.float32)}}
  total, parts = losses.multitask_loss(outputs, batch, ("normals", "edge"))
  resized = {t: losses._to_label_size(v, (6, 8))  # pylint: disable=protected-access
             for t, v in outputs["final"].items()}
  np.testing.assert_allclose(parts["final/normals"],
                             losses.normals_l1(resized["normals"], batch["normals"]), rtol=1e-6)
  np.testing.assert_allclose(
      parts["final/edge"], losses.weighted_bce(resized["edge"], batch["edge"], 0.95), rtol=1e-6)
  np.testing.assert_allclose(total, 10 * parts["final/normals"] + 50 * parts["final/edge"],
                             rtol=1e-6)
