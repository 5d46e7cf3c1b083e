"""ATRC's distillation module against a PyTorch transcription of ATRC's head code (NCHW).

The PyTorch side follows the structure and arithmetic of ATRC's `relationalcontext.py` and its
attention blocks: the global block as (V K^T) Q / (Z^T Q) with softplus keys and queries, the
local block through `F.unfold` (zero padding, the window in row-major order, as ATRC's CUDA
kernels index it), label contexts pooled by `prob @ features` from [B, K, HW] spatial softmaxes,
`out_proj` + concatenation + bottleneck per target. Same weights, float64, training mode (batch
statistics): the outputs, the parameter and input gradients and the BatchNorm running statistics
agree to float64 rounding. The projections' BN scales are set to non-zero values first, so that
every context contributes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from iterfuse_jax.models import atrc

torch = pytest.importorskip("torch")
F = torch.nn.functional
tnn = torch.nn

TASKS = ("semseg", "human_parts", "sal")
GENOTYPE = {
    "semseg": {"semseg": "local", "human_parts": "slabel", "sal": "tlabel"},
    "human_parts": {"semseg": "global", "human_parts": "none", "sal": "slabel"},
    "sal": {"semseg": "none", "human_parts": "none", "sal": "none"},
}
CLASSES = {"semseg": 4, "human_parts": 3, "sal": 2}
B, C, H, W, KERNEL = 2, 6, 5, 7, 3


class ConvBN(tnn.Module):

  def __init__(self, cin, cout, relu=True):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, 1, bias=False)
    self.bn = tnn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
    self.relu = relu

  def forward(self, x):
    x = self.bn(self.conv(x))
    return F.relu(x) if self.relu else x


class Block(tnn.Module):
  """One ATRC context block: queries, keys (two ConvBN each) and values (one ConvBN)."""

  def __init__(self, kind, cin, c):
    super().__init__()
    self.kind, self.c = kind, c
    last_relu = kind != "global"  # the global block's second projection feeds a softplus
    self.query_0, self.query_1 = ConvBN(cin, c), ConvBN(c, c, last_relu)
    self.key_0, self.key_1 = ConvBN(cin, c), ConvBN(c, c, last_relu)
    self.value = ConvBN(cin, c)

  def query(self, x):
    return self.query_1(self.query_0(x))

  def key(self, x):
    return self.key_1(self.key_0(x))

  def forward(self, target, source, target_prob, source_prob):
    b, _, h, w = target.shape
    if self.kind == "global":
      key = F.softplus(self.key(source)).flatten(2)  # b d hw
      value = self.value(source).flatten(2)  # b c hw
      query = F.softplus(self.query(target)).flatten(2)
      summary = torch.matmul(value, key.permute(0, 2, 1))  # b c d
      denominator = torch.matmul(key.sum(2).unsqueeze(1), query)  # b 1 hw
      return (torch.matmul(summary, query) / denominator.clamp_min(1e-12)).view(b, -1, h, w)
    if self.kind == "local":
      query, key, value = self.query(target), self.key(source), self.value(source)
      keys = F.unfold(key, KERNEL, padding=KERNEL // 2).view(b, self.c, KERNEL ** 2, h * w)
      values = F.unfold(value, KERNEL, padding=KERNEL // 2).view(b, self.c, KERNEL ** 2, h * w)
      similarity = (query.flatten(2).unsqueeze(2) * keys).sum(1)  # b k*k hw
      weight = F.softmax(similarity / math.sqrt(self.c), dim=1)
      return (values * weight.unsqueeze(1)).sum(2).view(b, self.c, h, w)
    prob = target_prob if self.kind == "tlabel" else source_prob  # b K hw
    pooled = torch.matmul(prob, source.flatten(2).permute(0, 2, 1))  # b K C
    context = pooled.permute(0, 2, 1).unsqueeze(3)  # b C K 1
    key = self.key(context).flatten(2)  # b d K
    value = self.value(context).flatten(2).permute(0, 2, 1)  # b K c
    query = self.query(target).flatten(2).permute(0, 2, 1)  # b hw d
    attention = (torch.matmul(query, key) / self.c ** 0.5).softmax(dim=-1)
    return torch.matmul(attention, value).permute(0, 2, 1).reshape(b, -1, h, w)


class TorchATRC(tnn.Module):

  def __init__(self):
    super().__init__()
    inner = C // 2
    self.cp = tnn.ModuleDict({f"{s}_to_{t}": Block(GENOTYPE[t][s], C, inner)
                              for t in TASKS for s in TASKS if GENOTYPE[t][s] != "none"})
    self.project, self.fuse = tnn.ModuleDict(), tnn.ModuleDict()
    for t in TASKS:
      n = sum(GENOTYPE[t][s] != "none" for s in TASKS)
      if n:
        self.project[t] = ConvBN(inner * n, C, relu=False)
      self.fuse[t] = ConvBN(2 * C if n else C, C)

  def forward(self, features, logits):
    probs = {t: F.softmax(x.flatten(2), dim=2) for t, x in logits.items()}  # b K hw
    out = {}
    for t in TASKS:
      messages = [self.cp[f"{s}_to_{t}"](features[t], features[s], probs.get(t), probs.get(s))
                  for s in TASKS if GENOTYPE[t][s] != "none"]
      x = features[t]
      if messages:
        x = torch.cat([x, self.project[t](torch.cat(messages, 1))], 1)
      out[t] = self.fuse[t](x)
    return out


def torch_key(collection, path):
  top, *mid, leaf = path
  for prefix, name in (("context_", "cp"), ("project_", "project"), ("fuse_", "fuse")):
    if top.startswith(prefix):
      top = f"{name}.{top[len(prefix):]}"
  names = {("params", "kernel"): "weight", ("params", "scale"): "weight",
           ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
           ("batch_stats", "var"): "running_var"}
  return ".".join([top, *mid, names[(collection, leaf)]])


def to_jax(collection, path, tensor):
  value = tensor.detach().numpy()
  if collection == "params" and path[-1] == "kernel":
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return value


def test_atrc_distillation_matches_a_pytorch_transcription_of_atrc():
  torch.manual_seed(0)
  port = TorchATRC().double().train()
  with torch.no_grad():  # open the zero-initialised projections; non-trivial BN everywhere
    for module in port.modules():
      if isinstance(module, tnn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
  rng = np.random.default_rng(0)
  feats_np = {t: rng.normal(size=(B, C, H, W)) for t in TASKS}
  logits_np = {t: rng.normal(size=(B, CLASSES[t], H, W)) * 2 for t in ("semseg", "human_parts",
                                                                      "sal")}
  weights_np = {t: rng.normal(size=(B, C, H, W)) for t in TASKS}
  initial = {k: v.clone() for k, v in port.state_dict().items()}  # before the forward's updates

  feats_t = {t: torch.tensor(v, requires_grad=True) for t, v in feats_np.items()}
  logits_t = {t: torch.tensor(v, requires_grad=True) for t, v in logits_np.items()}
  out_t = port(feats_t, logits_t)
  loss_t = sum((out_t[t] * torch.tensor(weights_np[t])).sum() for t in TASKS)
  loss_t.backward()

  nhwc = lambda x: x.transpose(0, 2, 3, 1)  # noqa: E731
  with jax.enable_x64(True):
    module = atrc.ATRCDistillation(TASKS, C, atrc.normalize_genotype(GENOTYPE, TASKS),
                                   kernel_size=KERNEL, dtype=jnp.float64)
    feats = {t: jnp.asarray(nhwc(v)) for t, v in feats_np.items()}
    logits = {t: jnp.asarray(nhwc(v)) for t, v in logits_np.items()}
    abstract = jax.eval_shape(
        lambda: module.init(jax.random.key(0), feats,
                            {t: atrc.spatial_probabilities(x) for t, x in logits.items()}))
    variables = {}
    for collection in ("params", "batch_stats"):
      flat = traverse_util.flatten_dict(abstract[collection])
      variables[collection] = traverse_util.unflatten_dict({
          p: to_jax(collection, p, initial[torch_key(collection, p)]) for p in flat})
    assert len(traverse_util.flatten_dict(variables["params"])) == len(list(port.parameters()))

    def loss_fn(params, feats, logits):
      probs = {t: atrc.spatial_probabilities(x) for t, x in logits.items()}
      out, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  feats, probs, train=True, mutable=["batch_stats"])
      loss = sum(jnp.sum(out[t] * jnp.asarray(nhwc(weights_np[t]))) for t in TASKS)
      return loss, (out, updates)

    (loss, (out, updates)), (g_params, g_feats, g_logits) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(variables["params"], feats, logits)

  np.testing.assert_allclose(float(loss), loss_t.item(), rtol=1e-10)
  for t in TASKS:
    np.testing.assert_allclose(np.asarray(out[t]), nhwc(out_t[t].detach().numpy()), rtol=1e-9,
                               atol=1e-11, err_msg=t)
    np.testing.assert_allclose(np.asarray(g_feats[t]), nhwc(feats_t[t].grad.numpy()), rtol=1e-8,
                               atol=1e-10, err_msg=f"d/d features[{t}]")
  for t in logits_np:
    np.testing.assert_allclose(np.asarray(g_logits[t]), nhwc(logits_t[t].grad.numpy()),
                               rtol=1e-8, atol=1e-10, err_msg=f"d/d logits[{t}]")
  port_params = dict(port.named_parameters())
  for path, g in traverse_util.flatten_dict(g_params).items():
    key = torch_key("params", path)
    np.testing.assert_allclose(np.asarray(g), to_jax("params", path, port_params[key].grad),
                               rtol=1e-8, atol=1e-10, err_msg=key)
  state = port.state_dict()
  for path, v in traverse_util.flatten_dict(updates["batch_stats"]).items():
    key = torch_key("batch_stats", path)
    np.testing.assert_allclose(np.asarray(v), state[key].numpy(), rtol=1e-10, err_msg=key)


def test_aux_losses_match_pytorch_transcriptions_of_atrcs():
  """ATRC's BinningCrossEntropyLoss (log bins 0.7..10 m, 40 bins) and its two-class
  CrossEntropyLoss (balanced; class-weighted), sum over the pixels divided by the valid ones.
  Depth 0 (no reading) is left out here: ATRC bins it into bin 0, this project ignores it."""
  from iterfuse_jax import losses  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(5)
  depth = rng.uniform(0.3, 12.0, size=(2, 6, 7))
  depth[0, 0, :3] = 255.0
  depth_logits = rng.normal(size=(2, 40, 6, 7))
  bins = torch.floor(40 * torch.log(torch.tensor(depth) / 0.7) / math.log(10.0 / 0.7))
  bins = bins.clamp(0, 39).long()
  bins[torch.tensor(depth) == 255] = 255
  want = F.cross_entropy(torch.tensor(depth_logits), bins, ignore_index=255)
  got = losses.aux_loss("depth", jnp.asarray(depth_logits.transpose(0, 2, 3, 1)),
                        jnp.asarray(depth, jnp.float32))
  np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)

  labels = rng.integers(0, 2, size=(2, 6, 7)).astype(np.float64)
  labels[1, 2, :4] = 255
  logits = rng.normal(size=(2, 2, 6, 7))
  lab = torch.tensor(labels).long()
  valid = lab != 255
  w_pos = (1.0 - lab[valid].double()).sum() / valid.sum()
  for task, weight in (("sal", torch.stack([1 - w_pos, w_pos])),
                       ("edge", torch.tensor([0.05, 0.95], dtype=torch.float64))):
    per_pixel = F.cross_entropy(torch.tensor(logits), lab, weight=weight, ignore_index=255,
                                reduction="none")
    want = per_pixel.sum() / valid.sum()
    got = losses.aux_loss(task, jnp.asarray(logits.transpose(0, 2, 3, 1)),
                          jnp.asarray(labels, jnp.float32))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5, err_msg=task)
