"""The streamed IFB against the materialized one: outputs, gradients, the CIB, and memory."""

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from iterfuse_jax.models import cross_task
from iterfuse_jax.models.iterative_fusion import iterative_fusion
from iterfuse_jax.models.streamed_fusion import (blockwise_attention, fused_dot_product_attention,
                                                 streamed_iterative_fusion)

B, M, D, C = 2, 37, 6, 5  # M is a multiple of no block size used below but 1 and 37.
BLOCK = 8


def _qkvw(seed=0, m=M, d=D, c=C, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.normal(size=(B, m, d)) * 1.5, dtype) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(B, m, c)), dtype)
  w = jnp.asarray(rng.normal(size=(B, m, c)), jnp.float32)  # weights of a scalar loss
  return q, k, v, w


def _materialized(q, k, v, alpha, n_iter, variant):
  return iterative_fusion(cross_task.affinity_matrix(q, k), v, alpha, n_iter, variant)


def _streamed(q, k, v, alpha, n_iter, variant, block_size=BLOCK):
  return streamed_iterative_fusion(q, k, v, alpha, n_iter, variant, block_size=block_size)


@functools.lru_cache(maxsize=None)
def _forward_and_grads(fn, n_iter, variant, **kwargs):
  """jit((q, k, v, alpha, w) -> ((loss, output), grads w.r.t. q, k, v, alpha)), compiled once."""
  def loss(q, k, v, alpha, w):
    out = fn(q, k, v, alpha, n_iter, variant, **kwargs)
    return jnp.sum(out * w), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _value_and_grads(fn, n_iter, variant, **kwargs):
  forward_and_grads = _forward_and_grads(fn, n_iter, variant, **kwargs)
  def run(*args):
    (loss, _), grads = forward_and_grads(*args)
    return loss, grads
  return run


def _assert_close(got, want, rtol=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-3))


@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("n_iter", [0, 1, 4])
def test_streamed_equals_materialized_forward_and_gradients_under_jit(variant, n_iter):
  q, k, v, w = _qkvw()
  alpha = jnp.float32(0.3)
  (got_loss, got_out), got = _forward_and_grads(_streamed, n_iter, variant)(q, k, v, alpha, w)
  (want_loss, want_out), want = _forward_and_grads(_materialized, n_iter, variant)(
      q, k, v, alpha, w)
  assert got_out.shape == (B, M, C) and got_out.dtype == jnp.float32
  _assert_close(got_out, want_out)
  _assert_close(got_loss, want_loss)
  for name, g, g_ref in zip("qkv", got[:3], want[:3]):
    assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
    _assert_close(g, g_ref, rtol=5e-5)
  # d/d alpha: zero for A (and for any variant at n_iter = 0), else a real, matching number.
  _assert_close(got[3], want[3], rtol=5e-5)
  if variant != "A" and n_iter > 0:
    assert abs(float(want[3])) > 1e-3


@pytest.mark.parametrize("block_size", [1, 5, 37, 64])
def test_any_block_size_gives_the_same_result(block_size):
  """Blocks of 1, a divisor-free size, exactly M and more than M (a single clamped block)."""
  q, k, v, w = _qkvw(1)
  alpha = jnp.float32(0.7)
  got_loss, got = _value_and_grads(_streamed, 4, "C", block_size=block_size)(q, k, v, alpha, w)
  want_loss, want = _value_and_grads(_materialized, 4, "C")(q, k, v, alpha, w)
  _assert_close(got_loss, want_loss)
  for g, g_ref in zip(got, want):
    _assert_close(g, g_ref, rtol=5e-5)


def test_large_logits_stay_finite():
  """The online softmax subtracts running maxima: logits of std ~36 (exp overflows at 88)."""
  q, k, v, w = _qkvw(2)
  q, k = q * 4.0, k * 4.0
  got_loss, got = _value_and_grads(_streamed, 4, "B")(q, k, v, jnp.float32(0.3), w)
  _, want = _value_and_grads(_materialized, 4, "B")(q, k, v, jnp.float32(0.3), w)
  assert np.isfinite(float(got_loss))
  for g, g_ref in zip(got, want):
    assert np.all(np.isfinite(np.asarray(g)))
    _assert_close(g, g_ref, rtol=2e-4)


def test_bfloat16_values_keep_dtype_and_match_the_materialized_ifb():
  q, k, v, _ = _qkvw(3, dtype=jnp.bfloat16)
  out = _streamed(q, k, v, jnp.float32(0.3), 4, "C")
  assert out.dtype == jnp.bfloat16
  ref = _materialized(q, k, v, jnp.float32(0.3), 4, "C")
  assert ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_blockwise_attention_with_scale_and_weight():
  q, k, v, w = _qkvw(4, d=3, c=7)
  weight, scale = jnp.float32(1.7), 0.4

  def reference(q, k, v, weight):
    co = jax.nn.softmax(jnp.einsum("bid,bjd->bij", q, k) * scale, axis=-1)
    return weight * jnp.einsum("bij,bjc->bic", co, v)

  def streamed(q, k, v, weight):
    return blockwise_attention(q, k, v, weight, scale=scale, block_size=BLOCK)

  _assert_close(streamed(q, k, v, weight), reference(q, k, v, weight))
  loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2, 3)))
  for g, g_ref in zip(loss(streamed)(q, k, v, weight), loss(reference)(q, k, v, weight)):
    _assert_close(g, g_ref, rtol=5e-5)


def test_fused_attention_plumbing_pads_head_sizes():
  """The cuDNN path's layout and zero-padding (d = 6, C = 5 -> one head of 8), run through XLA."""
  q, k, v, w = _qkvw(5)
  scale = 1.0 / np.sqrt(D)

  def fused(q, k, v):
    return fused_dot_product_attention(q, k, v, scale=scale, implementation="xla")

  def reference(q, k, v):
    return jnp.einsum("bij,bjc->bic", cross_task.affinity_matrix(q, k), v)

  out = fused(q, k, v)
  assert out.shape == (B, M, C) and out.dtype == jnp.float32
  _assert_close(out, reference(q, k, v))
  loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))
  for g, g_ref in zip(loss(fused)(q, k, v), loss(reference)(q, k, v)):
    _assert_close(g, g_ref, rtol=5e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="on a GPU 'auto' takes cuDNN's attention where it fits "
                    "(test_streamed_fusion_gpu.py checks that side)")
def test_auto_uses_the_blockwise_path_on_cpu():
  q, k, v, _ = _qkvw(6, dtype=jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(
      lambda q, k, v: streamed_iterative_fusion(q, k, v, jnp.float32(0.3), 2, "C"))(q, k, v))
  assert "custom_vjp_call" in jaxpr and "dot_product_attention" not in jaxpr


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="D"), "unknown IFB variant 'D'"),
    (dict(n_iter=-1), "n_iter must be a non-negative int"),
    (dict(q=jnp.zeros((M, D))), r"q must be \[B, M, d\]"),
    (dict(k=jnp.zeros((B, M, D + 1))), r"k must be \[B, M, d\]"),
    (dict(v=jnp.zeros((B, M + 1, C))), r"v must be \[B, M, C\]"),
    (dict(alpha=jnp.zeros((2,))), "alpha must be a scalar"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(block_size=8.0), "block_size must be a positive int"),
    (dict(attention_impl="flash"), "unknown attention_impl 'flash'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
  q, k, v, _ = _qkvw()
  args = dict(q=q, k=k, v=v, alpha=jnp.float32(0.3), n_iter=2, variant="C")
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    streamed_iterative_fusion(**args)


# --------------------------------------------------------------------------------------------
# The CIB with ifb_impl="streamed" is the same block with the same parameters.


@pytest.mark.parametrize("variant", ["A", "C"])
def test_streamed_cib_equals_materialized_cib(variant):
  kwargs = dict(channels=8, qk_channels=4, scale=2, variant=variant, n_iter=3)
  materialized = cross_task.CrossTaskInteractionBlock(**kwargs, ifb_impl="materialized")
  streamed = cross_task.CrossTaskInteractionBlock(**kwargs, ifb_impl="streamed")
  f_s, f_t = jax.random.normal(jax.random.key(1), (2, 2, 10, 14, 8))  # 5x7 = 35 positions
  init = jax.jit(functools.partial(materialized.init, train=False))
  variables = init(jax.random.key(0), f_s, f_t)
  # Train mode: batch statistics flow through Q/K/V too.
  def loss(module, params, f_s, f_t):
    out, _ = module.apply({**variables, "params": params}, f_s, f_t, train=True,
                          mutable=["batch_stats"])
    return jnp.sum(out * jnp.cos(out)), out

  grad = lambda module: jax.jit(jax.grad(functools.partial(loss, module), argnums=(0, 1, 2),
                                         has_aux=True))
  (g_streamed, out_streamed) = grad(streamed)(variables["params"], f_s, f_t)
  (g_materialized, out_materialized) = grad(materialized)(variables["params"], f_s, f_t)
  _assert_close(out_streamed, out_materialized)
  flat_s = jax.tree_util.tree_leaves_with_path(g_streamed)
  flat_m = jax.tree_util.tree_leaves(g_materialized)
  assert len(flat_s) == len(flat_m)
  names = {jax.tree_util.keystr(path) for path, _ in flat_s}
  assert any("alpha" in n for n in names) == (variant != "A")
  for (path, g), g_ref in zip(flat_s, flat_m):
    assert np.abs(np.asarray(g_ref)).max() > 0, jax.tree_util.keystr(path)
    _assert_close(g, g_ref, rtol=2e-4)


# --------------------------------------------------------------------------------------------
# Memory: no [M, M] array, forward or backward; only the V iterates are kept per iteration.


def _grad_fn(impl, n_iter, block_size=128):
  def loss(q, k, v, alpha):
    if impl == "streamed":
      out = streamed_iterative_fusion(q, k, v, alpha, n_iter, "C", block_size=block_size)
    else:
      out = _materialized(q, k, v, alpha, n_iter, "C")
    return jnp.sum(out)
  return jax.grad(loss, argnums=(0, 1, 2, 3))


def _temp_bytes(impl, m, n_iter, c=16):
  q = jax.ShapeDtypeStruct((1, m, c), jnp.float32)
  v = jax.ShapeDtypeStruct((1, m, c), jnp.float32)
  alpha = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = jax.jit(_grad_fn(impl, n_iter)).lower(q, q, v, alpha).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_backward_saves_only_v_iterates_and_row_log_sum_exps():
  m, c, n_iter = 100, 4, 5
  q, k, v, _ = _qkvw(7, m=m, d=6, c=c)
  report = io.StringIO()
  with contextlib.redirect_stdout(report):
    print_saved_residuals(
        lambda q, k, v, a: jnp.sum(streamed_iterative_fusion(q, k, v, a, n_iter, "C",
                                                             block_size=32)),
        q, k, v, jnp.float32(0.3))
  residuals = report.getvalue()
  # One line per residual, e.g. "f32[5,2,100,4] output of scan from ...".
  shapes = sorted({tuple(int(x) for x in dims.split(",") if x)
                   for dims in re.findall(r"^\w+\[([\d,]*)\]", residuals, re.M)})
  assert len(residuals.splitlines()) >= 4
  # Scalars, the inputs Q and K once, the V iterates and one log-sum-exp per row and iteration.
  assert shapes == sorted({(), (B, m, 6), (n_iter, B, m, c), (n_iter, B, m)}), residuals


def test_compiled_temp_memory_is_linear_in_m_and_far_below_materialized():
  n_iter = 6
  streamed_1k, streamed_2k = (_temp_bytes("streamed", m, n_iter) for m in (1024, 2048))
  materialized_1k, materialized_2k = (_temp_bytes("materialized", m, n_iter) for m in (1024, 2048))
  matrix_2k = 2048 * 2048 * 4
  # The materialized IFB holds Co and its gradient: O(M^2), ~4x when M doubles.
  assert materialized_2k > 2 * matrix_2k and materialized_2k / materialized_1k > 3.5
  # The streamed one holds a few [M, block] tiles and the iterates: O(M), ~2x when M doubles.
  assert streamed_2k < matrix_2k / 2, (streamed_2k, matrix_2k)
  assert streamed_2k / streamed_1k < 2.3, (streamed_1k, streamed_2k)
  assert streamed_2k * 8 < materialized_2k
