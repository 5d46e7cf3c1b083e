"""The streamed IFB's cuDNN path, on a CUDA GPU only (ITERFUSE_TEST_PLATFORM=gpu).

On a GPU, bfloat16 Q, K, V whose head size fits cuDNN's flash attention take
`jax.nn.dot_product_attention(implementation="cudnn")` (fused forward and backward) instead of the
blockwise lax path; these tests check that "auto" picks it, that XLA compiled it to cuDNN's fused
attention, and that values and gradients match the blockwise float32 path within bfloat16
rounding. On a CPU they skip (`test_auto_uses_the_blockwise_path_on_cpu` covers the other side).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax.models.streamed_fusion import streamed_iterative_fusion

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="cuDNN attention needs a CUDA GPU "
                                       "(ITERFUSE_TEST_PLATFORM=gpu)")

B, M, D, C = 2, 300, 40, 64  # head size 64: cuDNN's fused kernels take it on any recent GPU


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.normal(size=(B, M, D)), jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(B, M, C)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(B, M, C)), jnp.float32)
  return q, k, v, w


def _loss(attention_impl, n_iter=3):
  def loss(q, k, v, alpha, w):
    out = streamed_iterative_fusion(q, k, v, alpha, n_iter, "C", attention_impl=attention_impl)
    return jnp.sum(out.astype(jnp.float32) * w), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def test_auto_takes_cudnn_attention_for_bfloat16():
  q, k, v, _ = _inputs()
  jaxpr = str(jax.make_jaxpr(
      lambda q, k, v: streamed_iterative_fusion(q, k, v, jnp.float32(0.3), 2, "C"))(q, k, v))
  assert "dot_product_attention" in jaxpr or "cudnn" in jaxpr, jaxpr[:2000]
  hlo = jax.jit(lambda q, k, v: streamed_iterative_fusion(q, k, v, jnp.float32(0.3), 2, "C")
                ).lower(q, k, v).compile().as_text()
  assert "__cudnn$fmha" in hlo, "no cuDNN fused attention call in the compiled HLO"


def test_cudnn_path_matches_the_blockwise_path_in_value_and_gradients():
  q, k, v, w = _inputs(1)
  alpha = jnp.float32(0.3)
  (loss_c, out_c), grads_c = _loss("cudnn")(q, k, v, alpha, w)
  # The reference: the blockwise path on float32 copies of the same (bfloat16-valued) inputs.
  f32 = lambda x: x.astype(jnp.float32)
  (loss_b, out_b), grads_b = _loss("blockwise")(f32(q), f32(k), f32(v), alpha, w)
  assert out_c.dtype == jnp.bfloat16

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  assert rel(out_c, out_b) < 2e-2
  assert abs(float(loss_c) - float(loss_b)) <= 2e-2 * abs(float(loss_b)) + 1e-3
  for name, g_c, g_b in zip(("q", "k", "v", "alpha"), grads_c, grads_b):
    assert np.all(np.isfinite(np.asarray(g_c, np.float32))), name
    assert rel(g_c, g_b) < 5e-2, name
