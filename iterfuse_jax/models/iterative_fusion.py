"""The Iterative Fusion Block (IFB, paper Sec. 3.4) as a pure function.

Given the affinity matrix `Co` of a task pair (rows: target positions, each row a softmax over the
source positions) and the source values `V`, the IFB repeats one of three updates `n_iter` times:

  A: V <- Co V
  B: V <- alpha Co V + V
  C: V <- alpha Co V + (1 - alpha) V

so that, in closed form, A = Co^n V, B = (alpha Co + I)^n V, C = (alpha Co + (1 - alpha) I)^n V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iterfuse_jax.precision import accumulation_dtype

IFB_VARIANTS = ("A", "B", "C")


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


def iterative_fusion(co: jax.Array, v: jax.Array, alpha: jax.Array, n_iter: int,
                     variant: str = "C") -> jax.Array:
  """Runs the IFB.

  Args:
    co: [B, M, M] affinity matrix; row i holds the weights of all source positions for target i.
    v: [B, M, C] source values (V^0).
    alpha: scalar (0-d array) fusion weight; unused by variant A.
    n_iter: number of iterations, a static non-negative int; 0 returns `v` unchanged.
    variant: "A", "B" or "C".

  Returns:
    [B, M, C] V^{n_iter}, in the dtype of `v`.

  `Co` enters the loop as a loop-invariant constant, so it is built once per forward pass; under
  reverse-mode differentiation the loop keeps one [B, M, C] iterate per step (plus `Co` once), not one
  [B, M, M] matrix per step. Matrix products accumulate in at least float32.
  """
  check_ifb_args(variant, n_iter)
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

  out_dtype = v.dtype
  acc = accumulation_dtype(jnp.promote_types(co.dtype, v.dtype))
  alpha = alpha.astype(acc)

  def body(_, v_t):
    attended = jnp.einsum("bij,bjc->bic", co, v_t.astype(co.dtype), preferred_element_type=acc)
    return ifb_update(attended, v_t.astype(acc), alpha, variant).astype(out_dtype)

  return jax.lax.fori_loop(0, n_iter, body, v)
