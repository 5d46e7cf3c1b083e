"""Metrics against hand-computed cases: mIoU with absent classes, masks, merging, RMSE, saliency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax import metrics


def _one_hot_logits(ids, num_classes):
  """Logits whose argmax is `ids` ([B, H, W] -> [B, H, W, C])."""
  return jnp.asarray(np.eye(num_classes, dtype=np.float32)[np.asarray(ids)] * 5.0)


@pytest.fixture(scope="module")
def nyud_cls():
  return metrics.make_eval_metrics(("semseg", "depth"), "nyud")


@pytest.fixture(scope="module")
def nyud_update(nyud_cls):
  """One jitted update function reused by every test (compiles once per input shape)."""
  return jax.jit(lambda p, l, m: nyud_cls.single_from_model_output(
      predictions=p, labels=l, example_mask=m))


def _semseg_case():
  # 2 images of 2x3 pixels; ground truth uses classes 0, 1, 2; prediction also 3. 255 ignored.
  gt = np.array([[[0, 0, 1], [1, 2, 255]],
                 [[2, 2, 0], [255, 1, 1]]])
  pred = np.array([[[0, 1, 1], [1, 2, 0]],
                   [[2, 3, 0], [3, 1, 0]]])
  return gt, pred


def _np_semseg(gt, pred, num_classes):
  valid = gt != 255
  ious = []
  for c in range(num_classes):
    tp = np.sum((gt == c) & (pred == c) & valid)
    fp = np.sum((gt != c) & (pred == c) & valid)
    fn = np.sum((gt == c) & (pred != c) & valid)
    ious.append(tp / max(tp + fp + fn, 1e-8))
  return 100 * np.mean(ious), 100 * np.mean(pred[valid] == gt[valid])


def _depth_inputs(batch):
  return (jnp.ones((batch, 2, 3, 1)), jnp.ones((batch, 2, 3)))


def test_miou_with_absent_classes_and_pixel_accuracy(nyud_update):
  gt, pred = _semseg_case()
  depth_pred, depth_gt = _depth_inputs(2)
  update = nyud_update({"semseg": _one_hot_logits(pred, 40), "depth": depth_pred},
                       {"semseg": jnp.asarray(gt), "depth": depth_gt}, jnp.array([True, True]))
  results = {k: float(v) for k, v in update.compute().items()}
  # By hand over the 10 valid pixels (7 correct): class 0: TP 2, FP 1, FN 1 -> 2/4; class 1:
  # TP 3, FP 1, FN 1 -> 3/5; class 2: TP 2, FN 1 -> 2/3; class 3: FP 1 -> 0. The 36 classes with
  # neither ground truth nor prediction count as IoU 0 (the survey code's convention).
  expected_miou = 100 * (2 / 4 + 3 / 5 + 2 / 3 + 0) / 40
  np.testing.assert_allclose(results["semseg/miou"], expected_miou, rtol=1e-5)
  np.testing.assert_allclose(results["semseg/pixel_acc"], 100 * 7 / 10, rtol=1e-6)
  miou, acc = _np_semseg(gt, pred, 40)
  np.testing.assert_allclose(results["semseg/miou"], miou, rtol=1e-5)
  np.testing.assert_allclose(results["semseg/pixel_acc"], acc, rtol=1e-6)
  assert set(results) == {"semseg/miou", "semseg/pixel_acc", "depth/rmse", "depth/log_rmse",
                          "depth/abs_rel"}


def test_per_class_iou(nyud_update):
  gt, pred = _semseg_case()
  depth_pred, depth_gt = _depth_inputs(2)
  update = nyud_update({"semseg": _one_hot_logits(pred, 40), "depth": depth_pred},
                       {"semseg": jnp.asarray(gt), "depth": depth_gt}, jnp.array([True, True]))
  iou = np.asarray(update.semseg.per_class_iou())
  np.testing.assert_allclose(iou[:4], [2 / 4, 3 / 5, 2 / 3, 0.0], rtol=1e-6)
  assert np.all(iou[4:] == 0)
  assert int(update.semseg.matrix.sum()) == 10


def test_merge_of_batches_equals_one_batch_and_mask_excludes_padding(nyud_update):
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 40, (4, 2, 3))
  gt[0, 0, 0] = 255
  pred = rng.integers(0, 40, (4, 2, 3))
  depth_pred = rng.uniform(0.5, 3.0, (4, 2, 3, 1)).astype(np.float32)
  depth_gt = rng.uniform(0.0, 3.0, (4, 2, 3)).astype(np.float32)
  depth_gt[1, 0] = 0.0

  def update(idx, mask):
    return nyud_update({"semseg": _one_hot_logits(pred[idx], 40),
                        "depth": jnp.asarray(depth_pred[idx])},
                       {"semseg": jnp.asarray(gt[idx]), "depth": jnp.asarray(depth_gt[idx])},
                       jnp.asarray(mask))

  whole = update(slice(0, 4), [True] * 4).compute()
  merged = update(slice(0, 2), [True] * 2).merge(update(slice(2, 4), [True] * 2)).compute()
  for key in whole:
    np.testing.assert_allclose(merged[key], whole[key], rtol=1e-6, err_msg=key)

  # The last batch padded with two copies of garbage: the mask makes them contribute nothing.
  first_three = update(slice(0, 3), [True] * 3).compute()
  padded = np.concatenate([np.arange(3), [3]])
  with_padding = update(padded, [True, True, True, False]).compute()
  for key in first_three:
    np.testing.assert_allclose(with_padding[key], first_three[key], rtol=1e-6, err_msg=key)
  assert not np.allclose(whole["depth/rmse"], first_three["depth/rmse"])


def test_depth_rmse_over_valid_pixels_of_the_split(nyud_update):
  # Image 1: errors 1 and 2 on valid pixels (0 elsewhere = invalid, whatever is predicted).
  # Image 2: one valid pixel, error 3. Global RMSE = sqrt((1 + 4 + 9) / 3), not a mean of
  # per-image RMSEs (which would be (sqrt(2.5) + 3) / 2).
  gt = np.zeros((2, 2, 3), np.float32)
  pred = np.full((2, 2, 3, 1), 50.0, np.float32)
  gt[0, 0, 0], pred[0, 0, 0, 0] = 2.0, 3.0
  gt[0, 1, 2], pred[0, 1, 2, 0] = 4.0, 2.0
  gt[1, 1, 1], pred[1, 1, 1, 0] = 1.0, 4.0
  seg = jnp.zeros((2, 2, 3), jnp.int32)
  update = nyud_update({"semseg": _one_hot_logits(seg, 40), "depth": jnp.asarray(pred)},
                       {"semseg": seg, "depth": jnp.asarray(gt)}, jnp.array([True, True]))
  results = update.compute()
  np.testing.assert_allclose(results["depth/rmse"], np.sqrt(14 / 3), rtol=1e-6)
  log_err = [np.log(3 / 2), np.log(2 / 4), np.log(4 / 1)]
  np.testing.assert_allclose(results["depth/log_rmse"], np.sqrt(np.mean(np.square(log_err))),
                             rtol=1e-5)
  np.testing.assert_allclose(results["depth/abs_rel"], (1 / 2 + 2 / 4 + 3 / 1) / 3, rtol=1e-6)


def test_confusion_matrix_reports_out_of_range_labels(nyud_update):
  gt = jnp.array([[[0, 1, 41], [2, 255, 3]]])  # 41 is not a NYUD class
  update = nyud_update({"semseg": _one_hot_logits(np.zeros((1, 2, 3), int), 40),
                        "depth": jnp.ones((1, 2, 3, 1))},
                       {"semseg": gt, "depth": jnp.ones((1, 2, 3))}, jnp.array([True]))
  with pytest.raises(ValueError, match="outside"):
    update.compute()


def test_compute_under_jit_and_empty(nyud_cls, nyud_update):
  gt, pred = _semseg_case()
  depth_pred, depth_gt = _depth_inputs(2)
  update = nyud_update({"semseg": _one_hot_logits(pred, 40), "depth": depth_pred},
                       {"semseg": jnp.asarray(gt), "depth": depth_gt}, jnp.array([True, True]))
  jitted = jax.jit(lambda u: u.compute())(update)
  eager = update.compute()
  for key in eager:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6)
  merged = nyud_cls.empty().merge(update).compute()
  for key in eager:
    np.testing.assert_allclose(merged[key], eager[key], rtol=1e-6)
  assert metrics.make_eval_metrics(["semseg", "depth"], "nyud") is nyud_cls


def _np_saliency(prob, gt, thresholds):
  ious, precs, recs = [], [], []
  for p, g in zip(prob, gt):
    valid = g != 255
    g = (g == 1) & valid
    row_i, row_p, row_r = [], [], []
    for t in thresholds:
      m = (p > t) & valid
      tp, fp, fn = np.sum(m & g), np.sum(m & ~g), np.sum(~m & g)
      row_i.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
      row_p.append(tp / (tp + fp + 1e-12))
      row_r.append(tp / (tp + fn + 1e-12))
    ious.append(row_i)
    precs.append(row_p)
    recs.append(row_r)
  mi, mp, mr = (np.mean(x, 0) for x in (ious, precs, recs))
  return 100 * mi.max(), 100 * np.max(2 * mp * mr / (mp + mr + 1e-12))


@pytest.fixture(scope="module")
def pascal_update():
  cls = metrics.make_eval_metrics(("semseg", "human_parts", "sal"), "pascal")
  return cls, jax.jit(lambda p, l, m: cls.single_from_model_output(
      predictions=p, labels=l, example_mask=m))


def _pascal_inputs(sal_prob, sal_gt):
  b, h, w = sal_gt.shape
  seg = jnp.zeros((b, h, w), jnp.int32)
  logit = np.log(sal_prob / (1 - sal_prob)).astype(np.float32)[..., None]
  predictions = {"semseg": _one_hot_logits(seg, 21), "human_parts": _one_hot_logits(seg, 7),
                 "sal": jnp.asarray(logit)}
  labels = {"semseg": seg, "human_parts": seg, "sal": jnp.asarray(sal_gt)}
  return predictions, labels


def test_saliency_thresholds_crafted_case(pascal_update):
  _, update_fn = pascal_update
  # Image 1: gt positive on the left column (probabilities 0.95, 0.52, 0.32), negative on the
  # right (0.12, 0.62) with one ignored pixel (0.27). Image 2: nothing salient, nothing above
  # 0.2 -> IoU 1 at every threshold. Image 1's IoU by threshold: 0.2-0.3: TP 3, FP 1 -> 3/4;
  # 0.35-0.5: TP 2, FP 1, FN 1 -> 1/2; 0.55-0.6: 1/4; >= 0.65: 1/3.
  prob = np.array([[[0.95, 0.12], [0.52, 0.62], [0.32, 0.27]],
                   [[0.1, 0.1], [0.15, 0.05], [0.1, 0.1]]], np.float64)
  gt = np.array([[[1, 0], [1, 0], [1, 255]],
                 [[0, 0], [0, 0], [0, 0]]], np.uint8)
  predictions, labels = _pascal_inputs(prob, gt)
  results = update_fn(predictions, labels, jnp.array([True, True])).compute()
  max_iou, max_f = _np_saliency(prob, gt, metrics.SALIENCY_THRESHOLDS)
  np.testing.assert_allclose(results["sal/max_iou"], max_iou, rtol=1e-5)
  np.testing.assert_allclose(results["sal/max_f"], max_f, rtol=1e-5)
  # Best mean IoU: (3/4 + 1) / 2 at the thresholds 0.2-0.3.
  np.testing.assert_allclose(results["sal/max_iou"], 87.5, rtol=1e-5)


def test_saliency_mask_and_merge(pascal_update):
  cls, update_fn = pascal_update
  rng = np.random.default_rng(5)
  prob = rng.uniform(0.01, 0.99, (4, 4, 5))
  gt = (rng.uniform(size=(4, 4, 5)) < 0.4).astype(np.uint8)
  predictions, labels = _pascal_inputs(prob, gt)
  whole = update_fn(predictions, labels, jnp.array([True, True, True, False])).compute()
  first = {k: v[:3] for k, v in predictions.items()}, {k: v[:3] for k, v in labels.items()}
  three = update_fn(*first, jnp.array([True] * 3)).compute()
  for key in three:
    np.testing.assert_allclose(whole[key], three[key], rtol=1e-6, err_msg=key)
  max_iou, max_f = _np_saliency(prob[:3], gt[:3], metrics.SALIENCY_THRESHOLDS)
  np.testing.assert_allclose(three["sal/max_iou"], max_iou, rtol=1e-5)
  np.testing.assert_allclose(three["sal/max_f"], max_f, rtol=1e-5)
  assert set(three) == {"semseg/miou", "semseg/pixel_acc", "human_parts/miou",
                        "human_parts/pixel_acc", "sal/max_iou", "sal/max_f"}


def test_headline_metrics_and_delta_m_signs():
  results = {"semseg/miou": 40.0, "semseg/pixel_acc": 70.0, "depth/rmse": 0.6,
             "depth/log_rmse": 0.2}
  headline = metrics.headline_metrics(results, ("semseg", "depth"))
  assert headline == {"semseg": 40.0, "depth": 0.6}
  stl = {"semseg": 35.0091, "depth": 0.6610}
  # Better mIoU alone -> positive; lower RMSE alone -> positive; both worse -> negative.
  assert metrics.delta_m({"semseg": 40.0}, stl, ("semseg",)) > 0
  assert metrics.delta_m({"depth": 0.6}, stl, ("depth",)) > 0
  assert metrics.delta_m({"depth": 0.7}, stl, ("depth",)) < 0
  assert metrics.delta_m({"semseg": 30.0, "depth": 0.7}, stl, ("semseg", "depth")) < 0
  assert metrics.delta_m(stl, stl, ("semseg", "depth")) == 0.0
  # The paper's IterFuse (IFB C) rows (REFERENCE.md): NYUD +10.46 by the formula; PASCAL +5.085.
  np.testing.assert_allclose(
      metrics.delta_m({"semseg": 39.1596, "depth": 0.6011}, stl, ("semseg", "depth")),
      50 * ((39.1596 - 35.0091) / 35.0091 - (0.6011 - 0.6610) / 0.6610), rtol=1e-12)
  np.testing.assert_allclose(
      metrics.delta_m({"semseg": 39.1596, "depth": 0.6011}, stl, ("semseg", "depth")), 10.46,
      atol=0.01)
  pascal = metrics.delta_m(
      {"semseg": 65.5761, "human_parts": 63.1563, "sal": 66.944},
      {"semseg": 59.3427, "human_parts": 60.3365, "sal": 66.892},
      ("semseg", "human_parts", "sal"))
  np.testing.assert_allclose(pascal, 5.085, atol=0.001)


def test_headline_and_delta_m_errors():
  with pytest.raises(ValueError, match="sal/max_iou"):
    metrics.headline_metrics({"semseg/miou": 1.0}, ("semseg", "sal"))
  with pytest.raises(ValueError, match="reference"):
    metrics.delta_m({"semseg": 1.0}, {}, ("semseg",))
  with pytest.raises(ValueError, match="unknown task"):
    metrics.make_eval_metrics(("albedo",), "nyud")
  with pytest.raises(ValueError, match="no labels in dataset"):
    metrics.make_eval_metrics(("sal",), "nyud")


def test_shape_errors(nyud_cls):
  with pytest.raises(ValueError, match=r"\[B, H, W, 40\]"):
    nyud_cls.single_from_model_output(
        predictions={"semseg": jnp.zeros((1, 2, 2, 21)), "depth": jnp.zeros((1, 2, 2, 1))},
        labels={"semseg": jnp.zeros((1, 2, 2)), "depth": jnp.zeros((1, 2, 2))},
        example_mask=jnp.array([True]))
  with pytest.raises(ValueError, match="example_mask"):
    nyud_cls.single_from_model_output(
        predictions={"semseg": jnp.zeros((1, 2, 2, 40)), "depth": jnp.zeros((1, 2, 2, 1))},
        labels={"semseg": jnp.zeros((1, 2, 2)), "depth": jnp.zeros((1, 2, 2))},
        example_mask=jnp.array([True, False]))
  with pytest.raises(ValueError, match="labels"):
    nyud_cls.single_from_model_output(
        predictions={"semseg": jnp.zeros((1, 2, 2, 40)), "depth": jnp.zeros((1, 2, 2, 1))},
        labels={"semseg": jnp.zeros((1, 2, 2))}, example_mask=jnp.array([True]))


def test_batch_sharded_over_two_devices_equals_one_device(nyud_cls, nyud_update):
  """Under jit on a 2-device mesh (batch sharded as train.py does) the sums are the same."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py makes 2 CPU devices)")
  rng = np.random.default_rng(7)
  predictions = {"semseg": jnp.asarray(rng.normal(size=(4, 6, 5, 40)), jnp.float32),
                 "depth": jnp.asarray(rng.uniform(0.5, 3, (4, 6, 5, 1)), jnp.float32)}
  labels = {"semseg": jnp.asarray(rng.integers(0, 40, (4, 6, 5))),
            "depth": jnp.asarray(rng.uniform(0, 3, (4, 6, 5)), jnp.float32)}
  mask = jnp.array([True, True, True, False])
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:2]), ("data",)), PartitionSpec("data"))
  sharded = jax.device_put((predictions, labels, mask), sharding)
  on_two = nyud_update(*sharded)
  on_one = nyud_update(predictions, labels, mask)
  np.testing.assert_array_equal(on_two.semseg.matrix, on_one.semseg.matrix)
  for key, value in on_one.compute().items():
    np.testing.assert_allclose(on_two.compute()[key], value, rtol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------- normals and edges


def _normals_at_angles(angles_deg):
  """Ground truth (0, 0, -1) and predictions tilted by each angle about the x axis (unnormalised
  by a factor 3, which the metric must undo)."""
  a = np.radians(np.asarray(angles_deg, np.float64))
  pred = 3 * np.stack([np.zeros_like(a), np.sin(a), -np.cos(a)], -1)
  label = np.broadcast_to(np.array([0.0, 0.0, -1.0]), pred.shape)
  return pred.astype(np.float32), label.astype(np.float32)


@pytest.fixture(scope="module")
def full_nyud_cls():
  return metrics.make_eval_metrics(("semseg", "depth", "normals", "edge"), "nyud")


def test_normals_metric_hand_computed(full_nyud_cls):
  angles = np.array([[[0.0, 10.0, 20.0], [25.0, 40.0, 90.0]],
                     [[170.0, 5.0, 0.0], [0.0, 0.0, 0.0]]])  # [2, 2, 3]
  pred, label = _normals_at_angles(angles)
  label = label.copy()
  label[1, 1] = 0.0  # invalid pixels: the second image's last row
  mask = np.array([True, True])
  cls = metrics.make_eval_metrics(("normals",), "nyud")
  state = cls.single_from_model_output(predictions={"normals": jnp.asarray(pred)},
                                       labels={"normals": jnp.asarray(label)},
                                       example_mask=jnp.asarray(mask))
  got = state.compute()
  valid = np.array([0.0, 10.0, 20.0, 25.0, 40.0, 90.0, 170.0, 5.0, 0.0])
  np.testing.assert_allclose(got["normals/mean_angle"], valid.mean(), atol=1e-3)
  np.testing.assert_allclose(got["normals/rmse_angle"], np.sqrt((valid ** 2).mean()), atol=1e-3)
  np.testing.assert_allclose(got["normals/median_angle"], np.median(valid), atol=0.006)
  np.testing.assert_allclose(got["normals/within_11.25"], 100 * 4 / 9, rtol=1e-6)
  np.testing.assert_allclose(got["normals/within_22.5"], 100 * 5 / 9, rtol=1e-6)
  np.testing.assert_allclose(got["normals/within_30"], 100 * 6 / 9, rtol=1e-6)
  # Merging the images one by one equals scoring them together; a masked image counts nothing.
  one = [cls.single_from_model_output(predictions={"normals": jnp.asarray(pred[i:i + 1])},
                                      labels={"normals": jnp.asarray(label[i:i + 1])})
         for i in range(2)]
  merged = one[0].merge(one[1]).compute()
  for key, value in got.items():
    np.testing.assert_allclose(merged[key], value, rtol=1e-6)
  masked = cls.single_from_model_output(
      predictions={"normals": jnp.asarray(pred)}, labels={"normals": jnp.asarray(label)},
      example_mask=jnp.asarray([True, False])).compute()
  np.testing.assert_allclose(masked["normals/mean_angle"], angles[0].mean(), atol=1e-3)
  assert np.isnan(float(cls.empty().compute()["normals/mean_angle"]))


def test_edge_online_metric_and_headline_from_boundary_eval(full_nyud_cls):
  labels = np.zeros((1, 2, 2), np.int32)
  labels[0, 0, 0] = 1
  labels[0, 1, 1] = 255  # padding: left out
  state = metrics.make_eval_metrics(("edge",), "nyud").single_from_model_output(
      predictions={"edge": jnp.zeros((1, 2, 2, 1))}, labels={"edge": jnp.asarray(labels)})
  np.testing.assert_allclose(state.compute()["edge/loss"],
                             (0.95 * np.log(2) + 0.05 * 2 * np.log(2)) / 3, rtol=1e-6)
  assert metrics.headline_key("edge") == "edge/odsF"
  assert metrics.headline_key("normals") == "normals/mean_angle"
  assert set(full_nyud_cls.empty().compute()) >= {"normals/mean_angle", "edge/loss"}


def test_delta_m_signs_and_available_tasks_of_the_full_sets():
  stl = {"semseg": 40.0, "depth": 0.6, "normals": 20.0, "edge": 70.0}
  # Lower mean angle and higher odsF are improvements.
  assert metrics.delta_m({"normals": 19.0}, stl, ("normals",)) == pytest.approx(5.0)
  assert metrics.delta_m({"edge": 77.0}, stl, ("edge",)) == pytest.approx(10.0)
  tasks = ("semseg", "depth", "normals", "edge")
  online = {"semseg/miou": 44.0, "depth/rmse": 0.6, "normals/mean_angle": 19.0}
  # During training: odsF pending -> Delta_m over the other three.
  value, used = metrics.available_delta_m(online, stl, tasks)
  assert used == ("semseg", "depth", "normals") and value == pytest.approx((10 + 0 + 5) / 3)
  # After the boundary evaluation, all four; tasks without a reference (paper configs) drop out.
  value, used = metrics.available_delta_m({**online, "edge/odsF": 77.0}, stl, tasks)
  assert used == tasks and value == pytest.approx((10 + 0 + 5 + 10) / 4)
  paper_refs = {"semseg": 40.0, "depth": 0.6}
  assert metrics.available_delta_m({**online, "edge/odsF": 77.0}, paper_refs, tasks)[1] == (
      "semseg", "depth")
  # A missing online headline is still an error, and the strict Delta_m needs every task.
  with pytest.raises(ValueError, match="normals/mean_angle"):
    metrics.available_delta_m({"semseg/miou": 1.0, "depth/rmse": 1.0}, stl, tasks)
  with pytest.raises(ValueError, match="edge/odsF"):
    metrics.headline_metrics(online, tasks)
