"""Cross-task Interaction Block (CIB) and Task Pair Interaction Module (TPIM), paper Sec. 3.2-3.3."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.iterative_fusion import IFB_GRADIENTS, check_ifb_args, iterative_fusion
from iterfuse_jax.models.layers import ConvBNReLU, Dtype, resize_bilinear
from iterfuse_jax.precision import accumulation_dtype

IFB_IMPLEMENTATIONS = ("materialized", "streamed")
# The dtype of Co and V in the materialized IFB's products: the model's compute dtype (bfloat16
# under model.dtype="bfloat16", as PyTorch autocast computes them), or float32.
IFB_PRODUCTS = ("model", "float32")


def affinity_matrix(q: jax.Array, k: jax.Array) -> jax.Array:
  """Co = softmax(Q K^T / sqrt(d)) over source positions, in at least float32.

  q: [B, M, d] (target positions), k: [B, M, d] (source positions) -> [B, M, M].
  """
  d = q.shape[-1]
  logits = jnp.einsum("bid,bjd->bij", q, k, preferred_element_type=accumulation_dtype(q.dtype))
  return jax.nn.softmax(logits / math.sqrt(d), axis=-1)


class SpatialSelfAttention(nn.Module):
  """self = F_s(f) * sigmoid(F_m(f)), F_* 3x3 convs without bias or BN (paper eq. 1).

  The same block PAD-Net and MTI-Net use. [B, H, W, C] -> [B, H, W, features].
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    feat = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                   name="features")(x)
    mask = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                   name="mask")(x)
    return feat * nn.sigmoid(mask)


class CrossTaskInteractionBlock(nn.Module):
  """CIB(s -> t): what source task s contributes to target task t (paper eq. 1-4).

  f_{s->t} = self(f_s) + up(IFB(V, Co)), Co = softmax(Q K^T / sqrt(d)), Q from down(f_t), K and V
  from down(f_s) (1x1 conv + BN + ReLU each), down = average pooling by `scale`, up = bilinear.

  Attributes:
    channels: C, channels of the task features (and of V).
    qk_channels: d, channels of Q and K; None means d = C // 2 (the Non-local block's embedding
      halves the channels; the paper reduces the dimension but gives no number). V keeps C
      channels: it is added to the C-channel features.
    scale: sc, down/up-scaling factor around the global attention.
    use_ifb: False gives the paper's "w/o IFB" ablation, one plain `Co V`.
    variant: IFB variant "A", "B" or "C".
    n_iter: IFB iterations (static).
    alpha_init: initial value of the learnable scalar alpha.
    ifb_impl: "materialized" (builds Co once per forward) or "streamed" (never builds Co).
    ifb_products: the materialized IFB's product operands (IFB_PRODUCTS): "model" (`dtype`) or
      "float32". The streamed IFB chooses its own (streamed_fusion.py) and takes "model" only.
    ifb_gradient: the materialized IFB's backward (IFB_GRADIENTS): "stacked" (dCo as one
      product over all iterations) or "autodiff" (JAX's derivative of the loop; slower, kept
      as the reference and for before/after measurements). The streamed IFB has its own.
    dtype: computation dtype; the softmax and IFB accumulate in at least float32.

  Inputs f_s, f_t: [B, H, W, C] -> [B, H, W, C]. With the "intermediates" collection mutable, the
  block sows `affinity` ([B, M, M], materialized only), `values` (V, [B, M, C]) and the pooled grid
  size `grid` for inspection.
  """

  channels: int
  qk_channels: int | None = None
  scale: int = 2
  use_ifb: bool = True
  variant: str = "C"
  n_iter: int = 18
  alpha_init: float = 0.3
  ifb_impl: str = "materialized"
  ifb_products: str = "model"
  ifb_gradient: str = "stacked"
  dtype: Dtype = jnp.float32

  def check_options(self) -> None:
    """Raises a ValueError for a bad static option: `build_model` calls it, so that a bad config
    fails when the model is built, before anything is traced or compiled."""
    check_ifb_args(self.variant, self.n_iter)
    if self.ifb_impl not in IFB_IMPLEMENTATIONS:
      raise ValueError(
          f"unknown ifb_impl {self.ifb_impl!r}; expected one of {list(IFB_IMPLEMENTATIONS)}")
    if self.ifb_products not in IFB_PRODUCTS:
      raise ValueError(f"unknown ifb_products {self.ifb_products!r}; expected one of "
                       f"{list(IFB_PRODUCTS)}")
    if self.ifb_impl == "streamed" and self.ifb_products != "model":
      raise ValueError(
          f"ifb_products={self.ifb_products!r} applies to the materialized IFB; the streamed IFB "
          "computes its products in its own precision (cuDNN: the model's dtype; blockwise: "
          "float32): leave model.tpim.ifb_products at 'model'")
    if self.ifb_gradient not in IFB_GRADIENTS:
      raise ValueError(f"unknown ifb_gradient {self.ifb_gradient!r}; expected one of "
                       f"{list(IFB_GRADIENTS)}")
    if not isinstance(self.scale, int) or self.scale < 1:
      raise ValueError(f"scale must be a positive int, got {self.scale!r}")

  def _check(self, f_s: jax.Array, f_t: jax.Array) -> None:
    self.check_options()
    for name, f in (("f_s", f_s), ("f_t", f_t)):
      if f.ndim != 4 or f.shape[-1] != self.channels:
        raise ValueError(
            f"{name} must be [B, H, W, {self.channels}], got shape {f.shape}")
    if f_s.shape != f_t.shape:
      raise ValueError(f"f_s and f_t must have the same shape, got {f_s.shape} and {f_t.shape}")

  def _down(self, x: jax.Array) -> jax.Array:
    if self.scale == 1:
      return x
    s = (self.scale, self.scale)
    return nn.avg_pool(x, s, strides=s, padding="SAME", count_include_pad=False)

  @nn.compact
  def __call__(self, f_s: jax.Array, f_t: jax.Array, train: bool) -> jax.Array:
    self._check(f_s, f_t)
    c = self.channels
    d = self.qk_channels or max(c // 2, 1)

    self_features = SpatialSelfAttention(c, dtype=self.dtype, name="self_attention")(f_s)

    target, source = self._down(f_t), self._down(f_s)
    b, h, w, _ = source.shape
    q = ConvBNReLU(d, dtype=self.dtype, name="query")(target, train).reshape(b, h * w, d)
    k = ConvBNReLU(d, dtype=self.dtype, name="key")(source, train).reshape(b, h * w, d)
    v = ConvBNReLU(c, dtype=self.dtype, name="value")(source, train).reshape(b, h * w, c)
    self.sow("intermediates", "values", v)
    self.sow("intermediates", "grid", jnp.array([h, w], jnp.int32))

    variant, n_iter = (self.variant, self.n_iter) if self.use_ifb else ("A", 1)
    # Variant A (and "no IFB") has no alpha: a parameter that never gets a gradient would only
    # confuse optimiser state and checkpoints.
    if variant == "A":
      alpha = jnp.zeros((), jnp.float32)
    else:
      alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (), jnp.float32)
    if self.ifb_impl == "streamed":
      from iterfuse_jax.models.streamed_fusion import streamed_iterative_fusion  # pylint: disable=g-import-not-at-top
      fused = streamed_iterative_fusion(q, k, v, alpha, n_iter, variant)
    else:
      co = affinity_matrix(q, k)
      self.sow("intermediates", "affinity", co)
      products = self.dtype if self.ifb_products == "model" else jnp.float32
      fused = iterative_fusion(co, v, alpha, n_iter, variant, product_dtype=products,
                               gradient=self.ifb_gradient)

    fused = resize_bilinear(fused.reshape(b, h, w, c).astype(self_features.dtype),
                            f_t.shape[1:3])
    return self_features + fused


class TaskPairInteractionModule(nn.Module):
  """TPIM: for every target t, f_t_out = f_t + sum_{s != t} CIB(s -> t)(f_s, f_t) (paper eq. 5).

  The N diagonal blocks are identities, the N(N-1) others are CIBs named `cib_<s>_to_<t>`.
  Input and output: {task: [B, H, W, C]}.
  """

  tasks: Sequence[str]
  channels: int
  qk_channels: int | None = None
  scale: int = 2
  use_ifb: bool = True
  variant: str = "C"
  n_iter: int = 18
  alpha_init: float = 0.3
  ifb_impl: str = "materialized"
  ifb_products: str = "model"
  ifb_gradient: str = "stacked"
  dtype: Dtype = jnp.float32

  def _block_settings(self) -> dict:
    """The settings of each of its CrossTaskInteractionBlocks."""
    return dict(
        channels=self.channels, qk_channels=self.qk_channels, scale=self.scale,
        use_ifb=self.use_ifb, variant=self.variant, n_iter=self.n_iter,
        alpha_init=self.alpha_init, ifb_impl=self.ifb_impl, ifb_products=self.ifb_products,
        ifb_gradient=self.ifb_gradient, dtype=self.dtype)

  def check_options(self) -> None:
    """Raises a ValueError for a bad static option of its blocks (see the block's)."""
    CrossTaskInteractionBlock(**self._block_settings(), parent=None).check_options()

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool) -> dict[str, jax.Array]:
    missing = [t for t in self.tasks if t not in features]
    if missing:
      raise ValueError(f"TPIM got features for {sorted(features)}, missing tasks {missing}")
    out = {}
    for target in self.tasks:
      total = features[target]
      for source in self.tasks:
        if source == target:
          continue
        block = CrossTaskInteractionBlock(**self._block_settings(),
                                          name=f"cib_{source}_to_{target}")
        total = total + block(features[source], features[target], train)
      out[target] = total
    return out
