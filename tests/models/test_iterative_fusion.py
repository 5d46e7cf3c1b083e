"""The IFB against its closed forms, under jit and grad (both backward passes), and its memory."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax.models import iterative_fusion

B, M, C = 2, 12, 5


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  co = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, M, M)) * 2.0, jnp.float32), axis=-1)
  v = jnp.asarray(rng.normal(size=(B, M, C)), jnp.float32)
  return co, v


def _closed_form(co, v, alpha, n, variant):
  """Matrix-power closed forms in float64: A = Co^n V, B = (aCo + I)^n V, C = (aCo + (1-a)I)^n V."""
  co = np.asarray(co, np.float64)
  eye = np.eye(co.shape[-1])
  if variant == "A":
    op = co
  elif variant == "B":
    op = alpha * co + eye
  else:
    op = alpha * co + (1 - alpha) * eye
  return np.stack([np.linalg.matrix_power(op[b], n) @ np.asarray(v[b], np.float64)
                   for b in range(co.shape[0])])


_jitted = jax.jit(iterative_fusion, static_argnames=("n_iter", "variant"))
GRADIENTS = ("stacked", "autodiff")


@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("n_iter", [0, 1, 4, 18])
def test_matches_closed_form_under_jit(variant, n_iter):
  co, v = _inputs()
  alpha = 0.3
  got = _jitted(co, v, jnp.float32(alpha), n_iter=n_iter, variant=variant)
  want = _closed_form(co, v, alpha, n_iter, variant)
  # B grows like (1 + alpha)^n: compare relative to the output's scale.
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_zero_iterations_returns_input_unchanged():
  co, v = _inputs()
  out = iterative_fusion(co, v, jnp.float32(0.3), 0, "C")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(v))


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("variant", ["B", "C"])
@pytest.mark.parametrize("n_iter", [1, 4, 18])
def test_alpha_gradient_finite_nonzero_and_correct(variant, n_iter, gradient):
  co, v = _inputs(1)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(B, M, C)), jnp.float32)

  def loss(alpha):
    return jnp.sum(iterative_fusion(co, v, alpha, n_iter, variant, gradient=gradient) * w)

  grad = jax.jit(jax.grad(loss))(jnp.float32(0.3))
  assert np.isfinite(grad) and abs(float(grad)) > 1e-6
  # Central difference of the float64 closed form.
  eps = 1e-4
  f = lambda a: float(np.sum(_closed_form(co, v, a, n_iter, variant) * np.asarray(w)))
  numeric = (f(0.3 + eps) - f(0.3 - eps)) / (2 * eps)
  np.testing.assert_allclose(float(grad), numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("n_iter", [1, 4])
def test_gradients_match_the_unrolled_closed_form_in_float64(variant, n_iter, gradient):
  """d/dCo, d/dV and d/dalpha of both backward passes against autodiff of the unrolled float64
  matrix products (variant A has no alpha: its gradient is zero)."""
  co, v = _inputs(3)
  w = np.random.default_rng(5).normal(size=(B, M, C))

  def loss(co, v, alpha):
    return jnp.sum(jnp.sin(iterative_fusion(co, v, alpha, n_iter, variant, gradient=gradient))
                   * w.astype(np.float32))

  def loss_closed(co, v, alpha):
    a, r = {"A": (1.0, 0.0), "B": (alpha, 1.0), "C": (alpha, 1.0 - alpha)}[variant]
    out = v
    for _ in range(n_iter):
      out = a * (co @ out) + r * out
    return jnp.sum(jnp.sin(out) * w)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(co, v, jnp.float32(0.3))
  assert [g.dtype for g in got] == [jnp.float32] * 3
  with jax.enable_x64():
    want = jax.grad(loss_closed, argnums=(0, 1, 2))(
        jnp.asarray(co, jnp.float64), jnp.asarray(v, jnp.float64), jnp.float64(0.3))
    want = [np.asarray(x) for x in want]
  for name, g, wnt in zip(("dco", "dv", "dalpha"), got, want):
    np.testing.assert_allclose(np.asarray(g), wnt, rtol=1e-4, atol=1e-5, err_msg=name)
  if variant == "A":
    assert float(got[2]) == 0.0


@pytest.mark.parametrize("variant", ["A", "C"])
@pytest.mark.parametrize("product_dtype, v_dtype", [
    (None, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16)])
def test_stacked_and_autodiff_backward_agree(variant, product_dtype, v_dtype):
  """The two backward passes compute the same gradients: to float32 rounding in float32, within
  bfloat16 rounding (both against float64 are ~2e-3 here) with bfloat16 operands."""
  co, v = _inputs(6)
  w = jnp.asarray(np.random.default_rng(7).normal(size=(B, M, C)), jnp.float32)

  def grads(gradient):
    def loss(co, v, alpha):
      out = iterative_fusion(co, v.astype(v_dtype), alpha, 5, variant,
                             product_dtype=product_dtype, gradient=gradient)
      return jnp.sum(out.astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(co, v, jnp.float32(0.3))

  stacked, autodiff = grads("stacked"), grads("autodiff")
  tolerance = 1e-6 if product_dtype is None else 1.5e-2
  for name, a, b in zip(("dco", "dv", "dalpha"), stacked, autodiff):
    assert a.dtype == b.dtype, name
    if variant == "A" and name == "dalpha":
      assert float(a) == float(b) == 0.0
      continue
    assert _relative_error(a, b) < tolerance, (name, _relative_error(a, b))


def test_stacked_backward_forms_dco_in_one_product():
  """The stacked backward's dCo is one dot_general over [n_iter, B, M, C] cotangents and
  iterates, and no per-iteration g V^T ([B, M, C] x [B, M, C] -> [B, M, M]) remains; under
  "autodiff" the per-iteration product is there (what the H200 profile showed as the slow loop)."""
  co, v = _inputs()
  n = 6

  def text(gradient):
    loss = lambda co, v: jnp.sum(iterative_fusion(co, v, jnp.float32(0.3), n, "C",
                                                  gradient=gradient))
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(co, v).as_text()

  def kinds(gradient):
    return collections.Counter(tuple(t.shape for t in d[0]) + (d[1].shape,)
                               for d in _dots(text(gradient)))

  per_iteration = ((B, M, C), (B, M, C), (B, M, M))
  stacked = ((n, B, M, C), (n, B, M, C), (B, M, M))
  assert kinds("stacked")[stacked] == 1 and kinds("stacked")[per_iteration] == 0, kinds("stacked")
  assert kinds("autodiff")[per_iteration] >= 1 and kinds("autodiff")[stacked] == 0


def test_bfloat16_values_keep_dtype_and_accuracy():
  co, v = _inputs(4)
  out = iterative_fusion(co, v.astype(jnp.bfloat16), jnp.float32(0.3), 4, "C")
  assert out.dtype == jnp.bfloat16
  ref = iterative_fusion(co, v, jnp.float32(0.3), 4, "C")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=5e-2)


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_bfloat16_products_forward_and_backward_stay_accurate(gradient):
  """product_dtype=bfloat16: Co and V enter the forward products in bfloat16, and so do the
  backward's (dCo = g V^T, dV = Co^T g), all accumulating in float32; outputs and gradients stay
  within bfloat16 rounding of float64's.

  dCo sums n_iter contributions in float32: inside the one stacked product, or (autodiff) each
  comes back in float32 and they are added in float32. Measured here (M 256, C 16, n_iter 18),
  relative error of dCo: 2.2e-3 (stacked and autodiff alike), 5.4e-3 when Co is cast to
  bfloat16 once before the loop under plain autodiff (contributions added in bfloat16), 1.6e-7
  in float32.
  """
  m, c, n = 256, 16, 18
  rng = np.random.default_rng(0)
  logits, v, g = (rng.normal(size=shape) for shape in ((1, m, m), (1, m, c), (1, m, c)))

  def vjp(co, v, product_dtype):
    f = lambda co, v: iterative_fusion(co, v, jnp.asarray(0.3, co.dtype), n, "C",
                                       product_dtype=product_dtype, gradient=gradient)
    out, pullback = jax.vjp(f, co, v)
    return (out, *pullback(jnp.asarray(g, out.dtype)))

  with jax.enable_x64():
    co = jax.nn.softmax(jnp.asarray(logits * 3.0, jnp.float64), axis=-1)
    want = vjp(co, jnp.asarray(v, jnp.float64), None)
    assert want[0].dtype == jnp.float64
  co, v = co.astype(jnp.float32), jnp.asarray(v, jnp.float32)
  got = vjp(co, v, jnp.bfloat16)
  assert [x.dtype for x in got] == [jnp.float32] * 3
  errors = {name: _relative_error(a, b) for name, a, b in zip(("out", "dco", "dv"), got, want)}
  assert all(e < 3e-3 for e in errors.values()), errors

  text = jax.jit(lambda co, v: vjp(co, v, jnp.bfloat16)).lower(co, v).as_text()
  # Every product with Co or dCo in it: bfloat16 operands, float32 result. Co V and dV = Co^T g
  # (the loop bodies of forward and backward), dCo = g V^T (backward; stacked: over all
  # iterations at once).
  ifb = [d for d in _dots(text) if (1, m, m) in [t.shape for t in d[0]] + [d[1].shape]]
  assert all([t.dtype for t in d[0]] == ["bf16", "bf16"] and d[1].dtype == "f32"
             for d in ifb), ifb
  kinds = collections.Counter((d[0][0].shape, d[0][1].shape, d[1].shape) for d in ifb)
  assert kinds[((1, m, m), (1, m, c), (1, m, c))] >= 2, kinds
  d_co = ((n, 1, m, c), (n, 1, m, c), (1, m, m)) if gradient == "stacked" else (
      (1, m, c), (1, m, c), (1, m, m))
  assert kinds[d_co] >= 1, kinds


def _dots(text: str):
  """(operand types, result type) of every dot_general, as in tests/test_precision.py."""
  from tests.test_precision import ops  # pylint: disable=g-import-not-at-top
  return ops(text, "dot_general")


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="D"), "unknown IFB variant 'D'"),
    (dict(n_iter=-1), "n_iter must be a non-negative int"),
    (dict(n_iter=2.0), "n_iter must be a non-negative int"),
    (dict(co=jnp.zeros((B, M, M + 1))), r"co must be \[B, M, M\]"),
    (dict(co=jnp.zeros((M, M))), r"co must be \[B, M, M\]"),
    (dict(v=jnp.zeros((B, M + 1, C))), r"v must be \[B, M, C\]"),
    (dict(v=jnp.zeros((B, M))), r"v must be \[B, M, C\]"),
    (dict(alpha=jnp.zeros((2,))), "alpha must be a scalar"),
    (dict(gradient="manual"), "unknown IFB gradient 'manual'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
  co, v = _inputs()
  args = dict(co=co, v=v, alpha=jnp.float32(0.3), n_iter=2, variant="C")
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    iterative_fusion(**args)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("product_dtype", [None, jnp.bfloat16])
def test_backward_keeps_iterates_not_one_affinity_matrix_per_iteration(product_dtype, gradient):
  """Forward+backward temp memory grows by about one [M, C] iterate per extra iteration.

  With M >> C, keeping a [M, M] matrix per iteration would add M/C times more per iteration. With
  bfloat16 products, the bfloat16 copy of Co must not become a residual per iteration either.
  """
  m, c = 512, 8
  rng = np.random.default_rng(0)
  co = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, m, m)), jnp.float32), axis=-1)
  v = jnp.asarray(rng.normal(size=(1, m, c)), jnp.float32)

  def grad_fn(n):
    def loss(co, v, a):
      return jnp.sum(iterative_fusion(co, v, a, n, "C", product_dtype=product_dtype,
                                      gradient=gradient))
    return jax.grad(loss, argnums=(0, 1, 2))

  t4 = _temp_bytes(grad_fn(4), co, v, jnp.float32(0.3))
  t16 = _temp_bytes(grad_fn(16), co, v, jnp.float32(0.3))
  per_iter = (t16 - t4) / 12
  matrix = m * m * 4
  iterate = m * c * 4
  assert per_iter < matrix / 8, (t4, t16)
  assert per_iter <= 4 * iterate, (t4, t16, per_iter, iterate)
