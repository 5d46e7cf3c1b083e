"""ATRC, Adaptive Task-Relational Context (Bruggemann et al., "Exploring Relational Context for
Multi-Task Dense Prediction", ICCV 2021), as a distillation module, and the network around it.

For every ordered task pair (source s -> target t, s == t included) a genotype picks one context
type, found by ATRC's architecture search:

  none     the pair is cut
  global   linear attention over all source positions:
           out = (V K^T) q / (q . sum_j k_j), q, k = softplus(P(f)) (positive features)
  local    softmax attention over the 9x9 source window around each target position
           (positions outside the map count as zero keys and values, as ATRC's CUDA kernels)
  tlabel   softmax attention over class-pooled source features, pooled with the *target's*
           auxiliary class probabilities (each class a spatial distribution)
  slabel   the same, pooled with the *source's* auxiliary class probabilities

Each context block projects the target into queries and the source (or the pooled features) into
keys and values of C/2 channels (1x1 conv + BN + ReLU stacks). A target's messages are
concatenated, projected back to C (1x1 conv + BN, the BN's scale and bias initialised to 0, so
the module starts as if every pair were cut), concatenated with the target's own features and
fused (1x1 conv + BN + ReLU): `out_t = fuse_t(concat[f_t, project_t(concat_s m_{s->t})])`; a
target without sources is `fuse_t(f_t)`.

The label contexts need class probabilities: auxiliary heads (1x1 conv + BN + ReLU, 1x1 conv) on
the shared backbone features with the gradient stopped at their input, as ATRC's, predict every
task as a classification (`tasks.aux_num_classes`: depth in 40 log bins), supervised with
ATRC's losses under the output level "aux" (`losses.aux_loss`); `ATRCModule` holds them with
the context blocks. The class probabilities are the
auxiliary logits' softmax over positions, per class.

Following the paper (Sec. 4.1), the module replaces IterFuse's TPIM between the initial task
modules and the final heads; ATRC's searched genotypes (one per dataset and backbone, published
with its code as `atrc_genotype.json`) are read by `models.build` from the config. Each fusion
is followed, in training, by ATRC's channel dropout (whole channels of an image zeroed; p 0.05 in
ATRC's code: `dropout_rate`; its randomness is the "dropout" rng stream, which
`iterfuse_jax.train.train_step` draws from the seed and the step). Left out: ATRC's masking of
padded image regions before the spatial softmax (the pipeline here marks no pixel of the image as
padding).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.layers import BatchNorm, Dtype, HEAD_BN_MOMENTUM, BN_EPSILON
from iterfuse_jax.models.padnet import check_task_features
from iterfuse_jax.precision import accumulation_dtype

# A context's position is ATRC's genotype code (atrc_genotype.json: 0 none ... 4 s-label).
CONTEXTS = ("none", "global", "local", "tlabel", "slabel")
LABEL_CONTEXTS = ("tlabel", "slabel")
LOCAL_KERNEL = 9
# ATRC's channel dropout after each fusion (its module's default).
DROPOUT_RATE = 0.05
# ATRC's context blocks draw their convolution kernels from xavier-uniform; the prefix
# lets `initialization.pytorch_default_init` leave them as drawn.
CONTEXT_BLOCK_PREFIX = "context_"

Genotype = Mapping[str, Mapping[str, str]]


def normalize_genotype(genotype: str | Mapping[str, Mapping[str, object]],
                       tasks: Sequence[str]) -> dict[str, dict[str, str]]:
  """{target: {source: context name}} for every ordered pair of `tasks`.

  Args:
    genotype: one context name for every pair (ATRC's Global/Local/TLabel/SLabel baselines), or
      {target: {source: context}} with names or ATRC's integer codes (its atrc_genotype.json's
      "data"). Rows and columns of tasks not in `tasks` are ignored: a genotype searched on a
      larger task set applies to a subset, as the paper used ATRC's published search results.
    tasks: the network's tasks.

  Raises:
    ValueError naming the missing pair or the bad value.
  """
  tasks = tuple(tasks)
  if isinstance(genotype, str):
    if genotype not in CONTEXTS:
      raise ValueError(f"ATRC genotype {genotype!r}: expected one of {list(CONTEXTS)} or a "
                       "{target: {source: context}} mapping")
    return {t: {s: genotype for s in tasks} for t in tasks}
  if not isinstance(genotype, Mapping):
    raise ValueError(f"ATRC genotype must be a context name or a {{target: {{source: context}}}} "
                     f"mapping, got {type(genotype).__name__}")
  out = {}
  for target in tasks:
    row = genotype.get(target)
    if not isinstance(row, Mapping):
      raise ValueError(f"ATRC genotype has no row for target task {target!r} (rows: "
                       f"{sorted(genotype)})")
    out[target] = {}
    for source in tasks:
      if source not in row:
        raise ValueError(f"ATRC genotype row {target!r} has no entry for source task {source!r} "
                         f"(entries: {sorted(row)})")
      value = row[source]
      if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTEXTS):
        value = CONTEXTS[value]
      if value not in CONTEXTS:
        raise ValueError(f"ATRC genotype [{target!r}][{source!r}] = {row[source]!r}: expected "
                         f"one of {list(CONTEXTS)} or their codes 0..{len(CONTEXTS) - 1}")
      out[target][source] = value
  return out


def aux_tasks(genotype: Genotype, tasks: Sequence[str]) -> tuple[str, ...]:
  """The tasks whose auxiliary class probabilities a label context uses, in task order.

  t-label pairs use their target's, s-label pairs their source's.
  """
  needed = set()
  for target in tasks:
    for source in tasks:
      if genotype[target][source] == "tlabel":
        needed.add(target)
      elif genotype[target][source] == "slabel":
        needed.add(source)
  return tuple(t for t in tasks if t in needed)


def spatial_probabilities(logits: jax.Array) -> jax.Array:
  """[B, h, w, K] logits -> [B, h * w, K]: per class, a softmax over positions (float32+)."""
  b, h, w, k = logits.shape
  flat = logits.reshape(b, h * w, k).astype(accumulation_dtype(logits.dtype))
  return jax.nn.softmax(flat, axis=1)


def global_linear_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """ATRC's global context: out_i = sum_j (q_i . k_j) v_j / (q_i . sum_j k_j).

  query [B, M, d], key [B, N, d] (both positive), value [B, N, c] -> [B, M, c], computed as
  (V^T K) q without forming the M x N affinities; the denominator is clamped at 1e-12.
  """
  summary = jnp.einsum("bnd,bnc->bdc", key, value)
  denominator = jnp.einsum("bmd,bd->bm", query, jnp.sum(key, axis=1))
  return jnp.einsum("bmd,bdc->bmc", query, summary) / jnp.maximum(denominator, 1e-12)[..., None]


def local_window_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           kernel_size: int) -> jax.Array:
  """ATRC's local context: softmax(q . k / sqrt(d)) over each position's k x k window.

  query [B, H, W, d], key [B, H, W, d], value [B, H, W, c] -> [B, H, W, c]. Window positions
  off the map have a logit of 0 and contribute no value (zero padding, as ATRC's CUDA kernels).
  """
  if kernel_size % 2 != 1:
    raise ValueError(f"ATRC local context: kernel_size must be odd, got {kernel_size}")
  _, h, w, d = query.shape
  r = kernel_size // 2
  pad = ((0, 0), (r, r), (r, r), (0, 0))
  key, value = jnp.pad(key, pad), jnp.pad(value, pad)
  # k*k shifted slices, not a [B, H, W, k*k, c] patch tensor: 81 times the values' memory.
  offsets = [(dy, dx) for dy in range(kernel_size) for dx in range(kernel_size)]
  logits = jnp.stack([jnp.sum(query * key[:, dy:dy + h, dx:dx + w], axis=-1)
                      for dy, dx in offsets], axis=-1)
  weights = jax.nn.softmax(logits / math.sqrt(d), axis=-1)
  return sum(weights[..., i:i + 1] * value[:, dy:dy + h, dx:dx + w]
             for i, (dy, dx) in enumerate(offsets))


def class_pool(features: jax.Array, probabilities: jax.Array) -> jax.Array:
  """Features [B, M, C] pooled per class with spatial class probabilities [B, M, K] -> [B, K, C]."""
  return jnp.einsum("bmk,bmc->bkc", probabilities, features)


class Projection(nn.Module):
  """1x1 conv (no bias) + BN [+ ReLU]: [B, H, W, C_in] -> [B, H, W, features].

  `zero_scale` starts the BN's scale (and bias) at 0, so the projection outputs 0 at first.
  """

  features: int
  relu: bool = True
  zero_scale: bool = False
  xavier: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kernel_init = (nn.initializers.xavier_uniform() if self.xavier
                   else nn.linear.default_kernel_init)
    x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=kernel_init, dtype=self.dtype,
                name="conv")(x)
    x = BatchNorm(use_running_average=not train, momentum=HEAD_BN_MOMENTUM, epsilon=BN_EPSILON,
                  dtype=self.dtype,
                  scale_init=nn.initializers.zeros if self.zero_scale else nn.initializers.ones,
                  name="bn")(x)
    return nn.relu(x) if self.relu else x


class _ContextBlock(nn.Module):
  """Shared attributes of the context blocks; `channels`: C/2 of queries, keys and values."""

  channels: int
  dtype: Dtype = jnp.float32

  def project(self, x: jax.Array, name: str, train: bool, last_relu: bool = True) -> jax.Array:
    x = Projection(self.channels, xavier=True, dtype=self.dtype, name=f"{name}_0")(x, train)
    return Projection(self.channels, relu=last_relu, xavier=True, dtype=self.dtype,
                      name=f"{name}_1")(x, train)

  def value(self, x: jax.Array, train: bool) -> jax.Array:
    return Projection(self.channels, xavier=True, dtype=self.dtype, name="value")(x, train)


class GlobalContext(_ContextBlock):
  """Linear attention over every source position.

  Call: target [B, H, W, C], source [B, H, W, C] -> [B, H, W, channels]
  (label probabilities are accepted and unused).
  """

  @nn.compact
  def __call__(self, target, source, target_probs, source_probs, train):
    del target_probs, source_probs
    b, h, w, _ = target.shape
    acc = accumulation_dtype(self.dtype)
    c = self.channels
    key = nn.softplus(self.project(source, "key", train, False).astype(acc)).reshape(b, -1, c)
    query = nn.softplus(self.project(target, "query", train, False).astype(acc)).reshape(b, -1, c)
    value = self.value(source, train).astype(acc).reshape(b, -1, c)
    out = global_linear_attention(query, key, value)
    return out.reshape(b, h, w, c).astype(self.dtype)


class LocalContext(_ContextBlock):
  """Softmax attention over the kernel_size x kernel_size source window of each position.

  Call: target [B, H, W, C], source [B, H, W, C] -> [B, H, W, channels].
  """

  kernel_size: int = LOCAL_KERNEL

  @nn.compact
  def __call__(self, target, source, target_probs, source_probs, train):
    del target_probs, source_probs
    acc = accumulation_dtype(self.dtype)
    query = self.project(target, "query", train).astype(acc)
    key = self.project(source, "key", train).astype(acc)
    value = self.value(source, train).astype(acc)
    return local_window_attention(query, key, value, self.kernel_size).astype(self.dtype)


class LabelContext(_ContextBlock):
  """Softmax attention over class-pooled source features.

  The source features are pooled per class with the target's (`kind` "tlabel") or the source's
  ("slabel") auxiliary class probabilities: [B, K, C], the K classes' positions in the key grid.

  Call: target [B, H, W, C], source [B, H, W, C], target / source probabilities [B, H * W, K]
  -> [B, H, W, channels].
  """

  kind: str = "tlabel"

  @nn.compact
  def __call__(self, target, source, target_probs, source_probs, train):
    if self.kind not in LABEL_CONTEXTS:
      raise ValueError(f"ATRC label context kind must be one of {LABEL_CONTEXTS}, got "
                       f"{self.kind!r}")
    probs = target_probs if self.kind == "tlabel" else source_probs
    if probs is None:
      raise ValueError(f"ATRC {self.kind} context {self.name}: no auxiliary class probabilities")
    b, h, w, c_in = source.shape
    acc = accumulation_dtype(self.dtype)
    pooled = class_pool(source.reshape(b, h * w, c_in).astype(acc), probs)
    pooled = pooled[:, :, None, :].astype(self.dtype)  # [B, K, 1, C]: classes as positions
    key = self.project(pooled, "key", train).astype(acc).reshape(b, -1, self.channels)
    value = self.value(pooled, train).astype(acc).reshape(b, -1, self.channels)
    query = self.project(target, "query", train).astype(acc).reshape(b, h * w, self.channels)
    attention = jax.nn.softmax(
        jnp.einsum("bmd,bkd->bmk", query, key) / math.sqrt(self.channels), axis=-1)
    out = jnp.einsum("bmk,bkc->bmc", attention, value)
    return out.reshape(b, h, w, self.channels).astype(self.dtype)


def context_block(kind: str, channels: int, kernel_size: int, dtype: Dtype,
                  name: str) -> nn.Module:
  """The context block of `kind` ("global", "local", "tlabel" or "slabel")."""
  if kind == "global":
    return GlobalContext(channels, dtype=dtype, name=name)
  if kind == "local":
    return LocalContext(channels, dtype=dtype, kernel_size=kernel_size, name=name)
  if kind in LABEL_CONTEXTS:
    return LabelContext(channels, dtype=dtype, kind=kind, name=name)
  raise ValueError(f"no ATRC context block for {kind!r}")


class ATRCDistillation(nn.Module):
  """out_t = fuse_t(concat[f_t, project_t(concat[m_{s->t} for s with a context])]).

  Attributes:
    tasks: task names, in a fixed order.
    channels: C of the task features (input and output).
    genotype: {target: {source: context}} over `tasks` (see `normalize_genotype`).
    context_channels: channels of queries, keys, values and messages; 0 takes C // 2 (ATRC's).
    kernel_size: window of the local context.
    dropout_rate: probability of zeroing a channel of a fused output in training, per image
      (PyTorch's Dropout2d: the kept channels scaled by 1 / (1 - p)); ATRC trains with 0.05.
      Above 0, a training call needs a "dropout" rng.
    dtype: computation dtype.

  Call: features {task: [B, h, w, C]}, probabilities {task: [B, h * w, K_task]} for
  `aux_tasks(genotype, tasks)` -> {task: [B, h, w, C]}. Blocks are named
  `context_<source>_to_<target>`, projections `project_<target>`, fusions `fuse_<target>`.
  """

  tasks: Sequence[str]
  channels: int
  genotype: Genotype
  context_channels: int = 0
  kernel_size: int = LOCAL_KERNEL
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array],
               probabilities: Mapping[str, jax.Array], train: bool = False
               ) -> dict[str, jax.Array]:
    return self.distill(features, probabilities, train)

  def distill(self, features: Mapping[str, jax.Array], probabilities: Mapping[str, jax.Array],
              train: bool) -> dict[str, jax.Array]:
    """The body of `__call__`, also called by `ATRCModule` (its blocks land in the caller's
    scope, so both name their parameters alike)."""
    tasks = tuple(self.tasks)
    check_task_features(features, tasks, self.channels, "ATRCDistillation")
    genotype = normalize_genotype(self.genotype, tasks)
    missing = [t for t in aux_tasks(genotype, tasks) if t not in probabilities]
    if missing:
      raise ValueError(f"ATRCDistillation: the genotype's label contexts need the auxiliary "
                       f"class probabilities of {missing}; got them for {sorted(probabilities)}")
    inner = self.context_channels or max(self.channels // 2, 1)
    out = {}
    for target in tasks:
      messages = []
      for source in tasks:
        kind = genotype[target][source]
        if kind == "none":
          continue
        block = context_block(kind, inner, self.kernel_size, self.dtype,
                              f"{CONTEXT_BLOCK_PREFIX}{source}_to_{target}")
        messages.append(block(features[target], features[source], probabilities.get(target),
                              probabilities.get(source), train))
      x = features[target]
      if messages:
        projected = Projection(self.channels, relu=False, zero_scale=True, dtype=self.dtype,
                               name=f"project_{target}")(jnp.concatenate(messages, -1), train)
        x = jnp.concatenate([x, projected.astype(x.dtype)], axis=-1)
      fused = Projection(self.channels, dtype=self.dtype, name=f"fuse_{target}")(x, train)
      # One mask value per image and channel, shared by all positions.
      out[target] = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2),
                               name=f"dropout_{target}")(fused, deterministic=not train)
    return out


class ATRCModule(ATRCDistillation):
  """ATRC's distillation module with its auxiliary label heads: what replaces the TPIM.

  Attributes (besides `ATRCDistillation`'s):
    aux_classes: classes of the auxiliary prediction of each task in `aux_tasks(genotype)`.

  Call: features {task: [B, h, w, C]}, shared backbone features [B, h, w, C_shared] ->
  ({task: [B, h, w, C]}, {"aux": {task: [B, h, w, K_task]}} when a label context needs
  probabilities, else {}). `MultiTaskDenseNet` passes the shared features to a distillation
  module with `uses_shared_features` and supervises the extra levels it returns. Besides
  `ATRCDistillation`'s blocks, the heads are named `aux_conv_<task>` and `aux_predict_<task>`.
  """

  aux_classes: Mapping[str, int] | None = None
  uses_shared_features = True  # a class constant, not a dataclass field

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], shared: jax.Array,
               train: bool = False) -> tuple[dict[str, jax.Array], dict[str, dict]]:
    tasks = tuple(self.tasks)
    aux_classes = self.aux_classes or {}
    needed = aux_tasks(normalize_genotype(self.genotype, tasks), tasks)
    missing = [t for t in needed if t not in aux_classes]
    if missing:
      raise ValueError(f"ATRCModule: no aux_classes for {missing}, whose label probabilities the "
                       "genotype uses")
    # ATRC's auxiliary heads learn from their own loss only: no gradient into the backbone.
    detached = jax.lax.stop_gradient(shared)
    probabilities, aux = {}, {}
    for task in needed:
      x = Projection(shared.shape[-1], dtype=self.dtype, name=f"aux_conv_{task}")(detached, train)
      aux[task] = nn.Conv(aux_classes[task], (1, 1), dtype=self.dtype,
                          name=f"aux_predict_{task}")(x)
      probabilities[task] = spatial_probabilities(aux[task])
    return self.distill(features, probabilities, train), ({"aux": aux} if aux else {})
