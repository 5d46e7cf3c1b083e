"""A streamed Iterative Fusion Block that never builds the affinity matrix Co.

The materialized IFB (`iterative_fusion`) forms Co = softmax(Q K^T / sqrt(d)) once, [B, M, M], and
multiplies it into V `n_iter` times. At the paper's NYUD shape (M = 4800) that matrix is 92 MB per
task pair and image in float32, and its gradient as much again. This module instead recomputes
`Co V` in every iteration from Q and K, one block of source (key) positions at a time, with an
online softmax in float32 (the flash-attention scheme), so that no [M, M] array ever exists:

  * forward: per key block, logits [B, M, block] -> running row max, row sum and Co V accumulator;
  * backward (`jax.custom_vjp`): the forward keeps only its inputs and the log-sum-exp of every
    row, [B, M]; the backward recomputes the attention block by block, once to get the row terms
    D = rowsum(dO * O) and once more for dQ, dK, dV;
  * the IFB's `fori_loop` therefore keeps, per iteration, one V iterate [B, M, C] and one
    log-sum-exp row vector [B, M] for the backward pass.

Memory is O(M (C + block)) per task pair instead of O(M^2). The price is compute: Q K^T and the
exponentials are recomputed in every iteration, once in the forward and twice in the backward, about
3x the matrix work of the materialized IFB for a forward+backward (benchmarks/ifb_memory.py).

The IFB weight alpha is folded into the attention op (out = w * Co V) so that its gradient comes out
of the same recomputation; keeping `Co V` per iteration for d/d alpha would double the saved state.
The update formulas themselves come from `ifb_update`, evaluated on unit inputs (the update is
linear in Co V and V), so the three variants cannot drift apart from the materialized IFB.

On a GPU with bfloat16/float16 inputs whose head size fits cuDNN's flash attention, the attention is
delegated to `jax.nn.dot_product_attention(implementation="cudnn")` (fused forward and backward);
everything else, the CPU and the float32 default included, uses the blockwise `lax` path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from iterfuse_jax.models.iterative_fusion import check_ifb_args, ifb_update

ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "cudnn")
DEFAULT_BLOCK_SIZE = 512

_F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Blockwise attention-apply op with a recomputing backward.


def _key_blocks(k: jax.Array, v: jax.Array, block: int):
  """Splits keys and values into `n` blocks along M, padding the last one.

  Returns kb [n, B, block, d], vb [n, B, block, C] and `valid` [n, block] (bool; None when M is a
  multiple of `block`, so the unpadded case pays for no masking).
  """
  b, m, d = k.shape
  c = v.shape[-1]
  n = -(-m // block)
  pad = n * block - m
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0)))
    valid = (jnp.arange(n * block) < m).reshape(n, block)
  else:
    valid = None
  kb = k.reshape(b, n, block, d).transpose(1, 0, 2, 3)
  vb = v.reshape(b, n, block, c).transpose(1, 0, 2, 3)
  return kb, vb, valid


def _block_logits(q: jax.Array, k_j: jax.Array, valid_j, scale: float) -> jax.Array:
  """[B, M, block] float32 logits of all queries against one key block; padded keys -> -inf."""
  s = jnp.einsum("bid,bjd->bij", q, k_j, preferred_element_type=_F32) * scale
  if valid_j is not None:
    s = jnp.where(valid_j[None, None, :], s, -jnp.inf)
  return s


def _scan_blocks(fn, init, kb, vb, valid):
  """lax.scan over key blocks; `fn(carry, k_j, v_j, valid_j)` with valid_j None when unpadded."""
  if valid is None:
    return jax.lax.scan(lambda carry, xs: fn(carry, xs[0], xs[1], None), init, (kb, vb))
  return jax.lax.scan(lambda carry, xs: fn(carry, *xs), init, (kb, vb, valid))


def _attend_forward(q, k, v, weight, scale, block):
  """Returns (weight * softmax(q k^T scale) v in float32 [B, M, C], log-sum-exp rows [B, M])."""
  b, m, _ = q.shape
  c = v.shape[-1]
  # Inside the IFB loop Q and K are loop constants. When JAX linearizes the loop it hoists every
  # value that depends on constants only out of it: here that would be the logits of all key
  # blocks, i.e. the [B, M, M] matrix this module exists to avoid. Tying Q and K to V (unknown
  # until the loop runs) through a barrier keeps the logits inside the loop; it costs nothing.
  q, k, v = jax.lax.optimization_barrier((q, k, v))
  kb, vb, valid = _key_blocks(k, v, block)

  def step(carry, k_j, v_j, valid_j):
    row_max, row_sum, acc = carry
    s = _block_logits(q, k_j, valid_j, scale)
    # Every block holds at least one real key (padding < block), so new_max is finite and the
    # first block's correction exp(-inf - new_max) is an exact 0.
    new_max = jnp.maximum(row_max, s.max(axis=-1))
    correction = jnp.exp(row_max - new_max)
    p = jnp.exp(s - new_max[..., None])
    row_sum = row_sum * correction + p.sum(axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "bij,bjc->bic", p, v_j.astype(_F32), preferred_element_type=_F32)
    return (new_max, row_sum, acc), None

  init = (jnp.full((b, m), -jnp.inf, _F32), jnp.zeros((b, m), _F32), jnp.zeros((b, m, c), _F32))
  (row_max, row_sum, acc), _ = _scan_blocks(step, init, kb, vb, valid)
  out = acc * (weight / row_sum)[..., None]
  return out, row_max + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, weight, scale, block):
  return _attend_forward(q, k, v, weight, scale, block)[0]


def _attend_fwd(q, k, v, weight, scale, block):
  out, lse = _attend_forward(q, k, v, weight, scale, block)
  # Only the inputs (Q and K are loop constants of the IFB) and one float per row are kept.
  return out, (q, k, v, weight, lse)


def _attend_bwd(scale, block, residuals, g):
  q, k, v, weight, lse = residuals
  b, m, d = q.shape
  g = g.astype(_F32)
  kb, vb, valid = _key_blocks(k, v, block)

  def probabilities(k_j, valid_j):
    return jnp.exp(_block_logits(q, k_j, valid_j, scale) - lse[..., None])  # padded keys -> 0

  # Pass 1: D_i = sum_j P_ij (g_i . v_j) = rowsum(g * Co V), without keeping Co V from the forward.
  def row_terms(acc, k_j, v_j, valid_j):
    p = probabilities(k_j, valid_j)
    dp = jnp.einsum("bic,bjc->bij", g, v_j.astype(_F32), preferred_element_type=_F32)
    return acc + jnp.sum(p * dp, axis=-1), None

  dsum, _ = _scan_blocks(row_terms, jnp.zeros((b, m), _F32), kb, vb, valid)
  d_weight = jnp.sum(dsum)

  # Pass 2, with the cotangent of Co V being weight * g:
  #   dV_j = P_j^T (w g),  dS = w P * (g V_j^T - D) * scale,  dQ = sum_j dS_j K_j,  dK_j = dS_j^T Q.
  gw = weight * g
  qf = q.astype(_F32)

  def grads(dq, k_j, v_j, valid_j):
    p = probabilities(k_j, valid_j)
    dp = jnp.einsum("bic,bjc->bij", g, v_j.astype(_F32), preferred_element_type=_F32)
    ds = p * (dp - dsum[..., None]) * (weight * scale)
    dq = dq + jnp.einsum("bij,bjd->bid", ds, k_j.astype(_F32), preferred_element_type=_F32)
    dk_j = jnp.einsum("bij,bid->bjd", ds, qf, preferred_element_type=_F32)
    dv_j = jnp.einsum("bij,bic->bjc", p, gw, preferred_element_type=_F32)
    return dq, (dk_j, dv_j)

  dq, (dkb, dvb) = _scan_blocks(grads, jnp.zeros((b, m, d), _F32), kb, vb, valid)

  def unblock(x):
    n, _, blk, ch = x.shape
    return x.transpose(1, 0, 2, 3).reshape(b, n * blk, ch)[:, :m]

  return (dq.astype(q.dtype), unblock(dkb).astype(k.dtype), unblock(dvb).astype(v.dtype),
          d_weight.astype(weight.dtype))


_attend.defvjp(_attend_fwd, _attend_bwd)


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 3:
    raise ValueError(f"q must be [B, M, d], got shape {q.shape}")
  if k.shape != q.shape:
    raise ValueError(f"k must be [B, M, d] like q {q.shape}, got shape {k.shape}")
  if v.ndim != 3 or v.shape[:2] != q.shape[:2]:
    raise ValueError(
        f"v must be [B, M, C] with B, M = {q.shape[:2]} (from q), got shape {v.shape}")


def _check_block_size(block_size: int) -> None:
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int (static), got {block_size!r}")


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, weight: jax.Array | float = 1.0,
                        *, scale: float | None = None,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """weight * softmax(q k^T * scale) v without a [B, M, M] array, forward and backward.

  Args:
    q: [B, M, d] queries (target positions).
    k: [B, M, d] keys (source positions).
    v: [B, M, C] values (source positions).
    weight: scalar multiplier of the result (differentiable).
    scale: logit scale; None means 1 / sqrt(d).
    block_size: keys per block (static); M need not be a multiple of it.

  Returns:
    [B, M, C] float32. The softmax runs over the source positions in float32 whatever the inputs'
    dtype; gradients recompute the attention block by block from the stored row log-sum-exp.
  """
  _check_qkv(q, k, v)
  _check_block_size(block_size)
  weight = jnp.asarray(weight, _F32)
  if weight.ndim != 0:
    raise ValueError(f"weight must be a scalar, got shape {weight.shape}")
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  return _attend(q, k, v, weight, float(scale), min(block_size, q.shape[1]))


# ----------------------------------------------------------------------------------------------
# cuDNN flash attention (GPU, half precision).


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _fused_head_dim(d: int, c: int) -> int:
  """Head size of the fused kernel: Q/K and V share it, and cuDNN wants a multiple of 8."""
  return _round_up(max(d, c), 8)


def _max_cudnn_head_dim() -> int:
  """cuDNN flash attention takes head sizes up to 256 on Hopper and later, 128 before."""
  capability = getattr(jax.devices()[0], "compute_capability", "0.0")
  try:
    major = int(str(capability).split(".", maxsplit=1)[0])
  except ValueError:
    major = 0
  return 256 if major >= 9 else 128


def _cudnn_fits(q: jax.Array, v: jax.Array) -> bool:
  return (jax.default_backend() == "gpu"
          and q.dtype in (jnp.bfloat16, jnp.float16) and v.dtype == q.dtype
          and _fused_head_dim(q.shape[-1], v.shape[-1]) <= _max_cudnn_head_dim())


def fused_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                                implementation: str | None = "cudnn") -> jax.Array:
  """softmax(q k^T * scale) v through `jax.nn.dot_product_attention`, as one head.

  Q and K are zero-padded (which leaves the logits unchanged) and V zero-padded to one common head
  size, a multiple of 8, since the fused kernels need equal head sizes. `implementation="xla"`
  exercises the same plumbing on any backend (it builds the full logits, so only for tests).

  Args:
    q, k: [B, M, d]; v: [B, M, C]; scale: logit scale.
    implementation: passed to `jax.nn.dot_product_attention`.

  Returns:
    [B, M, C] float32.
  """
  _check_qkv(q, k, v)
  d, c = q.shape[-1], v.shape[-1]
  head = _fused_head_dim(d, c)
  dtype = q.dtype

  def as_head(x):
    x = x.astype(dtype)
    if x.shape[-1] < head:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, head - x.shape[-1])))
    return x[:, :, None, :]  # [B, M, 1 head, head size]

  out = jax.nn.dot_product_attention(as_head(q), as_head(k), as_head(v), scale=scale,
                                     implementation=implementation)
  return out[:, :, 0, :c].astype(_F32)


def _resolve_implementation(attention_impl: str, q: jax.Array, v: jax.Array) -> str:
  if attention_impl not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention_impl {attention_impl!r}; expected one of "
                     f"{list(ATTENTION_IMPLEMENTATIONS)}")
  if attention_impl == "auto":
    return "cudnn" if _cudnn_fits(q, v) else "blockwise"
  return attention_impl


# ----------------------------------------------------------------------------------------------
# The streamed IFB.


def streamed_iterative_fusion(q: jax.Array, k: jax.Array, v: jax.Array, alpha: jax.Array,
                              n_iter: int, variant: str = "C", *,
                              block_size: int = DEFAULT_BLOCK_SIZE,
                              attention_impl: str = "auto") -> jax.Array:
  """The IFB of `iterative_fusion(softmax(q k^T / sqrt(d)), v, alpha, n_iter, variant)`, streamed.

  Args:
    q: [B, M, d] queries from the target task.
    k: [B, M, d] keys from the source task.
    v: [B, M, C] values from the source task (V^0).
    alpha: scalar (0-d array) fusion weight; unused by variant A.
    n_iter: number of iterations, a static non-negative int; 0 returns `v` unchanged.
    variant: "A", "B" or "C".
    block_size: source positions per block of the blockwise path (static); any M works.
    attention_impl: "blockwise" (lax, any backend), "cudnn" (`jax.nn.dot_product_attention` with
      cuDNN: GPU, bfloat16/float16, head size max(d, C) rounded up to 8 at most 256 on Hopper),
      or "auto": cuDNN where it fits, else blockwise.

  Returns:
    [B, M, C] V^{n_iter}, in the dtype of `v`; equal (to float32 rounding) to the materialized IFB,
    and so are the gradients with respect to q, k, v and alpha.
  """
  check_ifb_args(variant, n_iter)
  _check_qkv(q, k, v)
  _check_block_size(block_size)
  alpha = jnp.asarray(alpha)
  if alpha.ndim != 0:
    raise ValueError(f"alpha must be a scalar, got shape {alpha.shape}")
  impl = _resolve_implementation(attention_impl, q, v)
  if n_iter == 0:
    return v

  out_dtype = v.dtype
  alpha = alpha.astype(_F32)
  one, zero = jnp.ones((), _F32), jnp.zeros((), _F32)
  # ifb_update is linear in (Co V, V): its value on unit inputs gives the two coefficients.
  attention_weight = ifb_update(one, zero, alpha, variant)
  residual_weight = None if variant == "A" else ifb_update(zero, one, alpha, variant)
  scale = 1.0 / math.sqrt(q.shape[-1])
  block = min(block_size, q.shape[1])

  def attend(v_t):
    if impl == "cudnn":
      return attention_weight * fused_dot_product_attention(q, k, v_t, scale=scale)
    return _attend(q, k, v_t, attention_weight, scale, block)

  def body(_, v_t):
    new = attend(v_t)
    if residual_weight is not None:
      new = new + residual_weight * v_t.astype(_F32)
    return new.astype(out_dtype)

  return jax.lax.fori_loop(0, n_iter, body, v)
