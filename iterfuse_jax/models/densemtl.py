"""DenseMTL's cross-task attention (Lopes et al., "Cross-task attention mechanism for dense
multi-task learning", WACV 2023) as a distillation module.

For every ordered task pair (s -> t) a cross-task attention block builds a message:

  g_s      = ReLU(conv3x3(f_s))                                   (directional features, with bias)
  sa       = F_s(g_s) * sigmoid(F_m(g_s))                         (self-attention, C/2 channels)
  corr     = gamma * up(softmax(Q K^T / sqrt(C)) V)               (correlation-guided attention)
             Q = P_Q(f_t subsampled by `scale`), K, V = P_K, P_V(maxpool_scale(g_s)),
             P_*: 1x1 conv + BN + ReLU, no channel reduction; up = nearest; gamma: [C], init 0
  m_{s->t} = P(concat[sa, corr])                                  (1x1 conv + BN + ReLU to C)

and each target fuses its own features with its incoming messages:
`out_t = P_t(concat[f_t, m_{s->t} for s != t])` (1x1 conv + BN + ReLU to C).

Because gamma starts at 0, the correlation-guided term contributes nothing at initialisation and
is blended in as training learns gamma per channel (the "per-channel mixing initialised to 0").
It plugs into `MultiTaskDenseNet.distillation` in place of IterFuse's TPIM (paper Sec. 4.1).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.cross_task import SpatialSelfAttention, affinity_matrix
from iterfuse_jax.models.layers import ConvBNReLU, Dtype, max_pool_first
from iterfuse_jax.models.padnet import check_task_features


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W, C] to [B, size[0], size[1], C].

  For an integer upscale this repeats every pixel, like PyTorch's `nn.Upsample(scale_factor=s)`.
  """
  h, w = int(size[0]), int(size[1])
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="nearest")


class CorrelationGuidedAttention(nn.Module):
  """gamma * up(softmax(Q K^T / sqrt(C)) V): what the source holds at positions the target asks for.

  The target is subsampled with stride `scale` (the query grid), the source max-pooled by `scale`
  (keys and values); the result is upsampled (nearest) back to the target's size and scaled per
  channel by `gamma`, initialised to 0.

  Attributes:
    channels: C of the features, of Q, K and V (no channel reduction).
    scale: down-scaling factor of the attention grid.
    dtype: computation dtype; the softmax is computed in float32.

  Call: target [B, H, W, C], source [B, H, W, C] -> [B, H, W, C]. Sows the per-channel-scaled
  output as `correlation` in the "intermediates" collection.
  """

  channels: int
  scale: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, target: jax.Array, source: jax.Array, train: bool) -> jax.Array:
    if not isinstance(self.scale, int) or self.scale < 1:
      raise ValueError(f"densemtl scale must be a positive int, got {self.scale!r}")
    s, c = self.scale, self.channels
    queries = target[:, ::s, ::s]
    keys = max_pool_first(source, s) if s > 1 else source
    b, hq, wq, _ = queries.shape
    q = ConvBNReLU(c, dtype=self.dtype, name="query")(queries, train).reshape(b, hq * wq, c)
    k_grid = ConvBNReLU(c, dtype=self.dtype, name="key")(keys, train)
    v_grid = ConvBNReLU(c, dtype=self.dtype, name="value")(keys, train)
    k = k_grid.reshape(b, -1, c)
    v = v_grid.reshape(b, -1, c)
    co = affinity_matrix(q, k)  # [B, Mq, Mk], softmax over source positions
    attended = jnp.einsum("bij,bjc->bic", co, v.astype(jnp.float32))
    attended = resize_nearest(attended.reshape(b, hq, wq, c), target.shape[1:3])
    gamma = self.param("gamma", nn.initializers.zeros, (c,), jnp.float32)
    out = (attended * gamma).astype(self.dtype)
    self.sow("intermediates", "correlation", out)
    return out


class CrossTaskAttention(nn.Module):
  """DenseMTL's message m_{s->t} = P(concat[SA(g_s), CGA(f_t, g_s)]), g_s = ReLU(conv3x3(f_s)).

  Attributes:
    channels: C of the task features.
    scale: down-scaling factor of the correlation-guided attention.
    dtype: computation dtype.

  Call: source f_s [B, H, W, C], target f_t [B, H, W, C] -> [B, H, W, C].
  """

  channels: int
  scale: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, source: jax.Array, target: jax.Array, train: bool) -> jax.Array:
    c = self.channels
    directed = nn.relu(nn.Conv(c, (3, 3), padding=1, dtype=self.dtype, name="extract")(source))
    # DenseMTL's self-attention emits half the channels, the correlation branch all of them.
    self_attention = SpatialSelfAttention(max(c // 2, 1), dtype=self.dtype,
                                          name="self_attention")(directed)
    correlation = CorrelationGuidedAttention(c, self.scale, dtype=self.dtype,
                                             name="correlation")(target, directed, train)
    return ConvBNReLU(c, dtype=self.dtype, name="project")(
        jnp.concatenate([self_attention, correlation], axis=-1), train)


class DenseMTLDistillation(nn.Module):
  """out_t = P_t(concat[f_t, m_{s->t} for s != t in task order]) with DenseMTL messages m.

  Attributes:
    tasks: task names, in a fixed order.
    channels: C of the task features (input and output).
    scale: down-scaling factor of every correlation-guided attention.
    dtype: computation dtype.

  Call: {task: [B, h, w, C]} -> {task: [B, h, w, C]}. Blocks are named `xtam_<s>_to_<t>` and
  the fusions `fuse_<t>`.
  """

  tasks: Sequence[str]
  channels: int
  scale: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool = False
               ) -> dict[str, jax.Array]:
    tasks = tuple(self.tasks)
    if len(tasks) < 2:
      raise ValueError(f"DenseMTLDistillation needs at least two tasks, got {tasks}")
    check_task_features(features, tasks, self.channels, "DenseMTLDistillation")
    out = {}
    for target in tasks:
      parts = [features[target]]
      for source in tasks:
        if source == target:
          continue
        block = CrossTaskAttention(self.channels, self.scale, dtype=self.dtype,
                                   name=f"xtam_{source}_to_{target}")
        parts.append(block(features[source], features[target], train))
      out[target] = ConvBNReLU(self.channels, dtype=self.dtype, name=f"fuse_{target}")(
          jnp.concatenate(parts, axis=-1), train)
    return out
