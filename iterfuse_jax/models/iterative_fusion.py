"""The Iterative Fusion Block (IFB, paper Sec. 3.4) as a pure function.

Given the affinity matrix `Co` of a task pair (rows: target positions, each row a softmax over the
source positions) and the source values `V`, the IFB repeats one of three updates `n_iter` times:

  A: V <- Co V
  B: V <- alpha Co V + V
  C: V <- alpha Co V + (1 - alpha) V

so that, in closed form, A = Co^n V, B = (alpha Co + I)^n V, C = (alpha Co + (1 - alpha) I)^n V.

The gradient of Co sums one outer product per iteration, dCo = a sum_t g_t V_t^T (a the update's
weight of Co V, g_t the cotangent of iteration t's output). Autodiff of the loop ("autodiff")
accumulates that sum in the loop's carry: every backward iteration writes a [B, M, M] product and
reads and writes a [B, M, M] float32 accumulator, about 3 GB of memory traffic per iteration at
the paper's NYUD shape, which made the backward loop 4.5x slower than the forward on an H200
(benchmarks/README.md). The default ("stacked") has its own backward: the loop keeps the n_iter
cotangents g_t, [n_iter, B, M, C], and dCo is then one product contracting over iterations and
channels together, [B, M, n_iter C] x [B, n_iter C, M], written once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iterfuse_jax.precision import accumulation_dtype

IFB_VARIANTS = ("A", "B", "C")
IFB_GRADIENTS = ("stacked", "autodiff")


def check_ifb_args(variant: str, n_iter: int) -> None:
  """Raises a ValueError for an unknown variant or a negative / non-integer iteration count."""
  if variant not in IFB_VARIANTS:
    raise ValueError(f"unknown IFB variant {variant!r}; expected one of {list(IFB_VARIANTS)}")
  if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
    raise ValueError(f"n_iter must be a non-negative int (static), got {n_iter!r}")


def ifb_update(attended: jax.Array, v: jax.Array, alpha: jax.Array, variant: str) -> jax.Array:
  """One IFB step given `attended = Co V` and the current `V` (both [..., M, C])."""
  if variant == "A":
    return attended
  if variant == "B":
    return alpha * attended + v
  return alpha * attended + (1.0 - alpha) * v


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_precision_product(co: jax.Array, v: jax.Array, product_dtype) -> jax.Array:
  """Co V on `product_dtype` operands, accumulated and returned in at least float32.

  co: [B, M, M], v: [B, M, C] -> [B, M, C]. The backward's two products (dCo = g V^T,
  dV = Co^T g) also take `product_dtype` operands (the cotangent rounded to it, as PyTorch
  autocast's bf16 backward does) and accumulate in float32; dCo comes back in Co's dtype without
  rounding to `product_dtype`. Plain autodiff of a product with a float32 result would instead
  run both backward products on float32 operands.
  """
  return _product(co, v, product_dtype)


def _product(co, v, product_dtype):
  acc = accumulation_dtype(jnp.promote_types(co.dtype, v.dtype))
  return jnp.einsum("bij,bjc->bic", co.astype(product_dtype), v.astype(product_dtype),
                    preferred_element_type=acc)


def _product_fwd(co, v, product_dtype):
  # The residuals are the inputs themselves: inside the IFB's loop Co is loop-invariant and is
  # saved once, not once per iteration (a cast copy would be a new residual per iteration).
  return _product(co, v, product_dtype), (co, v)


def _product_bwd(product_dtype, residuals, g):
  co, v = residuals
  acc = accumulation_dtype(jnp.promote_types(co.dtype, v.dtype))
  g = g.astype(product_dtype)
  d_co = jnp.einsum("bic,bjc->bij", g, v.astype(product_dtype), preferred_element_type=acc)
  d_v = jnp.einsum("bij,bic->bjc", co.astype(product_dtype), g, preferred_element_type=acc)
  return d_co.astype(co.dtype), d_v.astype(v.dtype)


mixed_precision_product.defvjp(_product_fwd, _product_bwd)


def iterative_fusion(co: jax.Array, v: jax.Array, alpha: jax.Array, n_iter: int,
                     variant: str = "C", product_dtype=None,
                     gradient: str = "stacked") -> jax.Array:
  """Runs the IFB.

  Args:
    co: [B, M, M] affinity matrix; row i holds the weights of all source positions for target i.
    v: [B, M, C] source values (V^0).
    alpha: scalar (0-d array) fusion weight; unused by variant A.
    n_iter: number of iterations, a static non-negative int; 0 returns `v` unchanged.
    variant: "A", "B" or "C".
    product_dtype: the dtype of Co and V as operands of the products Co V and of their
      gradients (None: the wider of their dtypes). bfloat16 halves the matrix's memory traffic
      and doubles tensor-core throughput; the products still accumulate in at least float32.
    gradient: how the backward pass is computed (IFB_GRADIENTS): "stacked" (the default; dCo
      as one product over all iterations) or "autodiff" (JAX's derivative of the loop, dCo
      accumulated per iteration). Same values to float32 rounding; "stacked" moves far fewer
      bytes and keeps no per-iteration Co V for d alpha.

  Returns:
    [B, M, C] V^{n_iter}, in the dtype of `v`.

  `Co` enters the loop as a loop-invariant constant, so it is built once per forward pass; under
  reverse-mode differentiation the loop keeps one [B, M, C] iterate per step (plus `Co` once), not
  one [B, M, M] matrix per step; the stacked backward keeps one [B, M, C] cotangent per step too.
  Matrix products accumulate in at least float32, and dCo's n_iter terms are summed in at least
  float32 (inside the one product, or in the autodiff loop's float32 carry).

  Under "autodiff" with a narrower `product_dtype` each product is a `mixed_precision_product`:
  Co is cast inside the loop body (XLA hoists the loop-invariant cast out of the loop), and the
  gradient of Co comes back from every iteration in Co's own dtype and is summed there. Casting
  Co once before the loop would sum the n_iter contributions in bfloat16, which measurably
  worsens dCo and with it dQ and dK (tests/models/test_iterative_fusion.py).
  """
  check_ifb_args(variant, n_iter)
  if gradient not in IFB_GRADIENTS:
    raise ValueError(f"unknown IFB gradient {gradient!r}; expected one of {list(IFB_GRADIENTS)}")
  if co.ndim != 3 or co.shape[1] != co.shape[2]:
    raise ValueError(f"co must be [B, M, M], got shape {co.shape}")
  if v.ndim != 3 or v.shape[:2] != co.shape[:2]:
    raise ValueError(
        f"v must be [B, M, C] with B, M = {co.shape[:2]} (from co), got shape {v.shape}")
  alpha = jnp.asarray(alpha)
  if alpha.ndim != 0:
    raise ValueError(f"alpha must be a scalar, got shape {alpha.shape}")
  if n_iter == 0:
    return v
  if product_dtype is None:
    product_dtype = jnp.promote_types(co.dtype, v.dtype)
  product_dtype = jnp.dtype(product_dtype)
  if gradient == "stacked":
    return _stacked_ifb(co, v, alpha, n_iter, variant, product_dtype)
  return _autodiff_ifb(co, v, alpha, n_iter, variant, product_dtype)


def _autodiff_ifb(co, v, alpha, n_iter, variant, product_dtype):
  acc = accumulation_dtype(jnp.promote_types(co.dtype, v.dtype))
  alpha = alpha.astype(acc)

  def body(_, v_t):
    if product_dtype == acc:
      return _ifb_step(co.astype(acc), v_t, alpha, variant, acc)
    attended = mixed_precision_product(co, v_t, product_dtype)
    return ifb_update(attended, v_t.astype(acc), alpha, variant).astype(v_t.dtype)

  return jax.lax.fori_loop(0, n_iter, body, v)


# ----------------------------------------------------------------------------------------------
# The stacked backward.


def _ifb_step(co_p, v_t, alpha, variant, acc):
  """One forward iteration on the product-dtype Co `co_p`; the result in v_t's dtype."""
  attended = jnp.einsum("bij,bjc->bic", co_p, v_t.astype(co_p.dtype),
                        preferred_element_type=acc)
  return ifb_update(attended, v_t.astype(acc), alpha, variant).astype(v_t.dtype)


def _update_coefficients(alpha, variant):
  """(a, r, da/dalpha, dr/dalpha) of the update V <- a Co V + r V."""
  if variant == "A":
    return 1.0, 0.0, 0.0, 0.0
  if variant == "B":
    return alpha, 1.0, 1.0, 0.0
  return alpha, 1.0 - alpha, 1.0, -1.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _stacked_ifb(co, v, alpha, n_iter, variant, product_dtype):
  acc = accumulation_dtype(jnp.promote_types(co.dtype, v.dtype))
  co_p, alpha = co.astype(product_dtype), alpha.astype(acc)
  return jax.lax.fori_loop(0, n_iter,
                           lambda _, v_t: _ifb_step(co_p, v_t, alpha, variant, acc), v)


def _stacked_ifb_fwd(co, v, alpha, n_iter, variant, product_dtype):
  acc = accumulation_dtype(jnp.promote_types(co.dtype, v.dtype))
  co_p, alpha_acc = co.astype(product_dtype), alpha.astype(acc)

  def body(v_t, _):
    return _ifb_step(co_p, v_t, alpha_acc, variant, acc), v_t

  out, iterates = jax.lax.scan(body, v, None, length=n_iter)
  # Co itself, not its product-dtype copy: the softmax that made Co keeps it for its own
  # backward anyway, so the residual costs nothing extra.
  return out, (co, iterates, alpha)


def _stacked_ifb_bwd(n_iter, variant, product_dtype, residuals, g):
  del n_iter  # the iterates' leading axis
  co, iterates, alpha = residuals  # iterates: [n_iter, B, M, C], V^0 ... V^{n_iter - 1}
  acc = accumulation_dtype(jnp.promote_types(co.dtype, iterates.dtype))
  a, r, da, dr = _update_coefficients(alpha.astype(acc), variant)
  co_p = co.astype(product_dtype)

  def body(carry, v_t):
    g_next, d_alpha = carry  # the cotangent of V^{t+1}, in acc
    g_p = g_next.astype(product_dtype)
    co_t_g = jnp.einsum("bij,bic->bjc", co_p, g_p, preferred_element_type=acc)  # Co^T g
    v_acc = v_t.astype(acc)
    g_t = a * co_t_g + r * g_next
    # d/dalpha of a <g, Co V> + r <g, V>, with <g, Co V> = <Co^T g, V>: no Co V kept.
    d_alpha = d_alpha + da * jnp.vdot(co_t_g, v_acc) + dr * jnp.vdot(g_next, v_acc)
    # The cotangent of Co V, a g, kept for dCo (rounded to the product dtype, as autodiff's).
    return (g_t, d_alpha), (a * g_next).astype(product_dtype)

  init = (g.astype(acc), jnp.zeros((), acc))
  (d_v, d_alpha), cotangents = jax.lax.scan(body, init, iterates, reverse=True)
  # dCo = sum_t (a g_t) V_t^T: one product contracting iterations and channels together.
  d_co = jnp.einsum("tbic,tbjc->bij", cotangents, iterates.astype(product_dtype),
                    preferred_element_type=acc)
  return d_co.astype(co.dtype), d_v.astype(iterates.dtype), d_alpha.astype(alpha.dtype)


_stacked_ifb.defvjp(_stacked_ifb_fwd, _stacked_ifb_bwd)
