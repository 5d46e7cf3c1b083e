"""Network outputs -> the predictions that are scored, at each image's original size.

The network predicts at the evaluation input size (480x640 on NYUD-v2, 512x512 on PASCAL); labels
are scored at the image's original size, which the eval pipeline stores top-left in a padded
canvas (`original_size` per example). Two orders of resizing and decoding exist:

  "survey" (default; the MTL survey code's `save_model_predictions`, which produced the published
  numbers): decode first, then resize with OpenCV's rule for the task, as the survey writes its
  prediction files:
    segmentation  argmax at the network's size, then nearest neighbour (OpenCV INTER_NEAREST:
                  output pixel x reads input pixel floor(x * in / out), rounded as OpenCV does)
    binary        probability = sigmoid(logit), scaled to 0..255, resized linearly (INTER_LINEAR,
                  half-pixel centres, no antialiasing), truncated to uint8 (the PNG file), / 255
    regression    the value resized linearly (also normals and edge logits, see LINEAR_KINDS)
  "logits": resize the logits linearly first, then decode (argmax / sigmoid in the metrics).

NYUD-v2 frames are all 480x640, the network's size, so there both orders give the same numbers;
on PASCAL (images of at most 500 pixels a side, network input 512x512) they differ slightly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iterfuse_jax import tasks as task_registry

EVAL_RESIZE_ORDERS = ("survey", "logits")
# Task kinds whose raw outputs are resized linearly in either order: depth values, normals (the
# metric normalises them; the survey's 8-bit normal PNGs are not reproduced) and edge logits (their
# online loss; odsF comes from iterfuse_jax.boundary_eval, which writes the survey's PNGs).
LINEAR_KINDS = ("regression", "normals", "boundary")


def check_order(order: str) -> str:
  if order not in EVAL_RESIZE_ORDERS:
    raise ValueError(f"unknown eval_resize {order!r}; expected one of {list(EVAL_RESIZE_ORDERS)}")
  return order


def resize_linear_to_canvas(x: jax.Array, original_size: jax.Array,
                            canvas: Sequence[int]) -> jax.Array:
  """Bilinearly resizes each map to its image's original size, top-left in a canvas.

  x: [B, h, w, C] at the network's size; original_size: [B, 2] (height, width); canvas: (H, W)
  of the padded labels. Returns float32 [B, H, W, C] whose top-left original_size[b] region is
  the resized map (the rest is padding, whose labels are ignored). Half-pixel centres, no
  antialiasing: PyTorch's `interpolate(bilinear, align_corners=False)` and OpenCV's INTER_LINEAR.
  """
  h, w = x.shape[1:3]

  def one(image, hw):
    scale = hw.astype(jnp.float32) / jnp.array([h, w], jnp.float32)
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (*canvas, image.shape[-1]), spatial_dims=(0, 1), scale=scale,
        translation=jnp.zeros(2, jnp.float32), method="linear", antialias=False)

  return jax.vmap(one)(x, original_size)


def opencv_nearest_indices(size_in: int, sizes_out: Sequence[int], length: int) -> np.ndarray:
  """[len(sizes_out), length] int32: row i holds the input index OpenCV's INTER_NEAREST reads for
  each output pixel when it resizes `size_in` pixels to sizes_out[i] (entries at and past
  sizes_out[i] are unused).

  OpenCV computes it in double precision, floor(x * (1 / (n / size_in))), clipped to the input.
  That is floor(x * size_in / n) except where x * size_in / n is a whole number that the rounded
  reciprocal brings just below it (e.g. 512 -> 98 pixels, x = 49: 255, not 256), so it is
  computed here as OpenCV computes it, in numpy's float64.
  """
  x = np.arange(length, dtype=np.float64)[None, :]
  n = np.maximum(np.asarray(sizes_out, np.float64).reshape(-1, 1), 1.0)
  return np.minimum(np.floor(x * (1.0 / (n / size_in))), size_in - 1).astype(np.int32)


def resize_nearest_to_canvas(ids: jax.Array, original_size: jax.Array,
                             canvas: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize of [B, h, w] maps to the original sizes, top-left in a canvas.

  Output pixel (y, x) of example b reads the input pixel OpenCV's INTER_NEAREST reads
  (`opencv_nearest_indices`: floor(y * h / H_b), floor(x * w / W_b) but for OpenCV's rounding).
  Returns [B, H, W] of the input's dtype; outside original_size[b] the values are padding.
  original_size must be within the canvas.
  """
  h, w = ids.shape[1:3]
  if isinstance(original_size, jax.core.Tracer):
    # Sizes known only when it runs (the jitted eval step): every size of the canvas in a table
    # (PASCAL's 512x512 canvas: 2 MiB).
    sizes = jnp.clip(original_size.astype(jnp.int32), 1, jnp.array(canvas[:2], jnp.int32))
    rows = jnp.asarray(opencv_nearest_indices(h, range(canvas[0] + 1), canvas[0]))[sizes[:, 0]]
    cols = jnp.asarray(opencv_nearest_indices(w, range(canvas[1] + 1), canvas[1]))[sizes[:, 1]]
  else:  # concrete sizes (a photo of any size in `Predictor.predict`): only theirs
    sizes = np.asarray(original_size)
    rows = jnp.asarray(opencv_nearest_indices(h, sizes[:, 0], canvas[0]))
    cols = jnp.asarray(opencv_nearest_indices(w, sizes[:, 1], canvas[1]))
  return jax.vmap(lambda image, r, c: image[r[:, None], c[None, :]])(ids, rows, cols)


def eval_predictions(outputs: Mapping[str, jax.Array], original_size: jax.Array,
                     canvas: Sequence[int], tasks: Sequence[str],
                     order: str = "survey") -> tuple[dict[str, jax.Array], bool]:
  """The predictions the metrics score, at the original image sizes.

  Args:
    outputs: {task: [B, h, w, C_task]} final logits at the network's size.
    original_size: [B, 2] int (height, width) of each image.
    canvas: (H, W) of the padded labels.
    tasks: the tasks to return.
    order: "survey" or "logits" (module docstring).

  Returns:
    (predictions, decoded). With "survey", decoded is True and predictions are segmentation ids
    [B, H, W] int32, binary probabilities [B, H, W, 1] float32 (multiples of 1/255) and regression
    values, normals and edge logits [B, H, W, C]; with "logits", decoded is False and every
    prediction is the resized logits [B, H, W, C] float32.
  """
  check_order(order)
  predictions = {}
  for task in tasks:
    logits = outputs[task]
    kind = task_registry.get_task(task).kind
    if order == "logits" or kind in LINEAR_KINDS:
      predictions[task] = resize_linear_to_canvas(logits, original_size, canvas)
    elif kind == "segmentation":
      ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      predictions[task] = resize_nearest_to_canvas(ids, original_size, canvas)
    elif kind == "binary":
      levels = 255.0 * jax.nn.sigmoid(logits.astype(jnp.float32))
      resized = resize_linear_to_canvas(levels, original_size, canvas)
      # The survey writes uint8 PNGs (truncation) and scores value / 255.
      predictions[task] = jnp.floor(jnp.clip(resized, 0.0, 255.0)) / 255.0
    else:
      raise ValueError(f"task {task!r} has kind {kind!r}, which eval_predictions cannot decode")
  return predictions, order == "survey"
