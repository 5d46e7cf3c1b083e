"""Evaluation resizing: the survey code's order (decode, then resize) and ours (resize logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax import eval_resizing, metrics

torch = pytest.importorskip("torch")

CANVAS = (6, 7)


def test_nearest_follows_opencvs_rule_per_example():
  """Output pixel x reads input floor(x * in / out), each example at its own original size."""
  ids = jnp.arange(2 * 4 * 4, dtype=jnp.int32).reshape(2, 4, 4)
  sizes = jnp.array([[3, 5], [6, 2]], jnp.int32)
  out = np.asarray(eval_resizing.resize_nearest_to_canvas(ids, sizes, CANVAS))
  assert out.shape == (2, *CANVAS) and out.dtype == np.int32
  for b, (h, w) in enumerate(np.asarray(sizes)):
    rows = [y * 4 // h for y in range(h)]  # 3 rows from 4: 0, 1, 2; 6 rows from 4: 0,0,1,2,2,3
    cols = [x * 4 // w for x in range(w)]
    np.testing.assert_array_equal(out[b, :h, :w], np.asarray(ids[b])[np.ix_(rows, cols)])
  assert [y * 4 // 6 for y in range(6)] == [0, 0, 1, 2, 2, 3]


def test_nearest_is_opencvs_own_at_the_sizes_where_its_rounding_shows():
  """OpenCV computes floor(x * (1 / (out / in))) in double precision: 512 -> 98 pixels reads input
  255 at x = 49, where 49 * 512 / 98 is exactly 256. Checked against cv2 itself (the survey's
  save_model_predictions) for the network sizes of both datasets to every PASCAL image size."""
  cv2 = pytest.importorskip("cv2")
  assert 49 * 512 // 98 == 256 and eval_resizing.opencv_nearest_indices(512, [98], 98)[0, 49] == 255
  for size_in in (512, 480, 640):
    table = eval_resizing.opencv_nearest_indices(size_in, range(501), 500)
    source = np.arange(size_in, dtype=np.uint16)[None, :]
    for n in range(1, 501):
      expected = cv2.resize(source, (n, 1), interpolation=cv2.INTER_NEAREST)[0]
      np.testing.assert_array_equal(table[n, :n], expected, err_msg=f"{size_in} -> {n}")
  # And through the resize, per example, with sizes known only when it runs (the jitted eval
  # step) and with concrete ones (Predictor.predict): rows and columns where OpenCV rounds.
  ids = jnp.arange(512, dtype=jnp.int32)[None, :, None] * 1000 + jnp.arange(512)[None, None, :]
  ids = jnp.concatenate([ids, ids + 1])
  sizes = jnp.array([[98, 374], [500, 98]], jnp.int32)
  traced = jax.jit(eval_resizing.resize_nearest_to_canvas, static_argnums=2)(ids, sizes,
                                                                              (500, 500))
  concrete = eval_resizing.resize_nearest_to_canvas(ids, sizes, (500, 500))
  for b, (h, w) in enumerate(np.asarray(sizes)):
    expected = cv2.resize(np.asarray(ids[b], np.float32), (int(w), int(h)),
                          interpolation=cv2.INTER_NEAREST).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(traced)[b, :h, :w], expected)
    np.testing.assert_array_equal(np.asarray(concrete)[b, :h, :w], expected)


def test_linear_matches_pytorch_bilinear_up_and_down():
  x = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
  sizes = np.array([[6, 7], [3, 2]], np.int32)
  out = np.asarray(eval_resizing.resize_linear_to_canvas(jnp.asarray(x), jnp.asarray(sizes),
                                                         CANVAS))
  for b, (h, w) in enumerate(sizes):
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x[b:b + 1]).permute(0, 3, 1, 2), size=(int(h), int(w)), mode="bilinear",
        align_corners=False).permute(0, 2, 3, 1).numpy()[0]
    np.testing.assert_allclose(out[b, :h, :w], expected, rtol=1e-5, atol=1e-6)


def test_the_two_orders_on_a_hand_made_case():
  """Segmentation: nearest of the argmax vs argmax of bilinear logits. Saliency: linear
  resize of 255 * sigmoid truncated to uint8 vs sigmoid of the resized logit."""
  # 1x2 network output, upsampled to 1x4 (canvas 1x4).
  seg_logits = jnp.array([[[[4.0, 0.0], [0.0, 1.0]]]])  # classes: pixel 0 -> 0, pixel 1 -> 1
  sal_logits = jnp.array([[[[-2.0], [2.0]]]])
  size = jnp.array([[1, 4]], jnp.int32)
  outputs = {"semseg": seg_logits, "sal": sal_logits}

  survey, decoded = eval_resizing.eval_predictions(outputs, size, (1, 4), ("semseg", "sal"),
                                                   "survey")
  assert decoded
  # Nearest: x * 2 // 4 -> input 0, 0, 1, 1.
  np.testing.assert_array_equal(survey["semseg"][0, 0], [0, 0, 1, 1])
  # Linear from 2 to 4 pixels: source x = (x + 0.5) / 2 - 0.5 -> -0.25, 0.25, 0.75, 1.25, i.e.
  # weights of pixel 1: 0, 0.25, 0.75, 1 (borders clamp).
  p0, p1 = 1 / (1 + np.exp(2.0)), 1 / (1 + np.exp(-2.0))
  levels = [255 * ((1 - a) * p0 + a * p1) for a in (0.0, 0.25, 0.75, 1.0)]
  np.testing.assert_allclose(survey["sal"][0, 0, :, 0], np.floor(levels) / 255, rtol=1e-6)

  ours, decoded = eval_resizing.eval_predictions(outputs, size, (1, 4), ("semseg", "sal"),
                                                 "logits")
  assert not decoded
  # Bilinear logits: class 0 scores 4, 3, 1, 0; class 1 scores 0, 0.25, 0.75, 1 -> argmax 0,0,0,1.
  np.testing.assert_array_equal(jnp.argmax(ours["semseg"][0, 0], -1), [0, 0, 0, 1])
  logit = np.array([-2.0, -1.0, 1.0, 2.0])
  np.testing.assert_allclose(jax.nn.sigmoid(ours["sal"][0, 0, :, 0]), 1 / (1 + np.exp(-logit)),
                             rtol=1e-6)

  # The metrics score both forms; on this case they disagree on the segmentation.
  cls = metrics.make_eval_metrics(("semseg", "sal"), "pascal")
  labels = {"semseg": jnp.array([[[0, 0, 1, 1]]]), "sal": jnp.array([[[0, 0, 1, 1]]])}
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, n - x.shape[-1])))  # noqa: E731
  survey_scores = cls.single_from_model_output(predictions=survey, labels=labels,
                                               decoded=True).compute()
  ours_scores = cls.single_from_model_output(
      predictions={"semseg": pad(ours["semseg"], 21), "sal": ours["sal"]}, labels=labels
  ).compute()
  assert float(survey_scores["semseg/pixel_acc"]) == 100.0
  assert float(ours_scores["semseg/pixel_acc"]) == 75.0


def test_decoded_and_logit_predictions_score_the_same_when_nothing_is_resized():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 5, 6, 21)), jnp.float32)
  sal = jnp.asarray(rng.normal(size=(2, 5, 6, 1)), jnp.float32)
  labels = {"semseg": jnp.asarray(rng.integers(0, 21, (2, 5, 6))),
            "sal": jnp.asarray(rng.integers(0, 2, (2, 5, 6)))}
  cls = metrics.make_eval_metrics(("semseg", "sal"), "pascal")
  from_logits = cls.single_from_model_output(
      predictions={"semseg": logits, "sal": sal}, labels=labels).compute()
  decoded = cls.single_from_model_output(
      predictions={"semseg": jnp.argmax(logits, -1).astype(jnp.int32),
                   "sal": jax.nn.sigmoid(sal)}, labels=labels, decoded=True).compute()
  for key, value in from_logits.items():
    np.testing.assert_allclose(decoded[key], value, rtol=1e-6, err_msg=key)


def test_bad_order_and_bad_decoded_predictions_are_named():
  with pytest.raises(ValueError, match="unknown eval_resize 'bicubic'"):
    eval_resizing.check_order("bicubic")
  cls = metrics.make_eval_metrics(("semseg",), "nyud")
  with pytest.raises(ValueError, match="decoded predictions must be integer class ids"):
    cls.single_from_model_output(predictions={"semseg": jnp.zeros((1, 2, 2))},
                                 labels={"semseg": jnp.zeros((1, 2, 2), jnp.int32)}, decoded=True)
