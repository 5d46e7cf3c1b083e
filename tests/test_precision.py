"""model.dtype is obeyed: what the compiled train step computes in bfloat16 and what in float32.

With model.dtype = "bfloat16" the step must run every convolution and the resize products on
bfloat16 operands, while the attention logits accumulate in float32, the softmax over positions
stays float32, and every IFB product (Co V and its gradients) accumulates in float32: on bfloat16
operands by default (model.tpim.ifb_products="model", as PyTorch autocast), on float32 ones with
ifb_products="float32". With "float32" nothing may be bfloat16. These are read off the step's StableHLO (what JAX asks XLA to compute) on any backend;
on a GPU (ITERFUSE_TEST_PLATFORM=gpu) also off the optimised HLO that XLA compiled, where the
convolutions are cuDNN calls. A model that ignored model.dtype fails here, whatever its losses.
"""

import collections
import functools
import re

import jax
import pytest

from benchmarks import train_step as bench
from iterfuse_jax import train
from iterfuse_jax.models import build_model

SIZE = 32
TASKS = ("semseg", "depth")


def _setting(dtype: str, impl: str, ifb_products: str = "model") -> bench.Setting:
  return bench.Setting(framework="jax", impl=impl, dataset="nyud", height=SIZE, width=SIZE,
                       batch=2, n_iter=2, variant="C", task_channels=8, dtype=dtype, steps=1,
                       warmup=0, ifb_products=ifb_products)


def _jitted_step_and_args(dtype: str, impl: str, ifb_products: str = "model"):
  """The benchmark's jitted train step and abstract arguments (nothing is initialised)."""
  config = bench.benchmark_config(_setting(dtype, impl, ifb_products))
  model = build_model(config)
  schedule = train.create_learning_rate_schedule(config, 10)
  tx = train.create_optimizer(config, schedule)
  mesh = train.create_mesh(1)
  state = jax.eval_shape(
      lambda key: train.create_train_state(config, model, tx, key, (1, SIZE, SIZE, 3), mesh),
      jax.random.key(0))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
           for k, v in bench.random_batch("nyud", TASKS, 2, SIZE, SIZE, 0).items()}
  step = jax.jit(functools.partial(train.train_step, tasks=TASKS,
                                   loss_weights=dict(config.loss_weights), schedule=schedule))
  return step, state, batch


@functools.cache
def _stablehlo(dtype: str, impl: str, ifb_products: str = "model") -> str:
  step, state, batch = _jitted_step_and_args(dtype, impl, ifb_products)
  return step.lower(state, batch).as_text()


Tensor = collections.namedtuple("Tensor", "shape dtype")


def _tensor(text: str) -> Tensor:
  *dims, dtype = text.split("x")
  return Tensor(tuple(int(d) for d in dims), dtype)


def ops(text: str, name: str) -> list[tuple[list[Tensor], Tensor]]:
  """(operand types, result type) of every `stablehlo.<name>` in a module's text."""
  out = []
  binary = re.compile(rf"stablehlo\.{name}\b[^\n]*?: \(([^)]*)\) -> tensor<([^>]*)>")
  unary = re.compile(rf"stablehlo\.{name}\b[^\n]*?: tensor<([^>]*)>\n")
  for m in binary.finditer(text):
    operands = [_tensor(t) for t in re.findall(r"tensor<([^>]*)>", m.group(1))]
    out.append((operands, _tensor(m.group(2))))
  if not out:
    for m in unary.finditer(text):
      t = _tensor(m.group(1))
      out.append(([t], t))
  return out


@pytest.mark.parametrize("impl", ["materialized", pytest.param("streamed", marks=pytest.mark.slow)])
def test_bfloat16_step_convolves_in_bfloat16_and_attends_in_float32(impl):
  text = _stablehlo("bfloat16", impl)
  convs = ops(text, "convolution")
  assert len(convs) > 100, "the HRNet train step has hundreds of convolutions"
  f32_convs = [c for c in convs if any(t.dtype != "bf16" for t in c[0]) or c[1].dtype != "bf16"]
  assert not f32_convs, (f"{len(f32_convs)} of {len(convs)} convolutions not in bf16: "
                         f"{f32_convs[:3]}")

  dots = ops(text, "dot_general")
  # Rank 4: the bilinear resizes as products with interpolation matrices (bfloat16).
  resize_dots = [d for d in dots if d[1].shape and len(d[1].shape) == 4]
  assert resize_dots and all(t.dtype == "bf16" for d in resize_dots for t in d[0]), resize_dots
  # Rank 3, [B, M, *]: the attention logits Q K^T, the IFB's Co V and their gradients.
  ifb_dots = [d for d in dots if len(d[1].shape) == 3]
  assert ifb_dots, "no attention / IFB products found"
  assert all(d[1].dtype == "f32" for d in ifb_dots), [d for d in ifb_dots if d[1].dtype != "f32"]
  logits = [d for d in ifb_dots if all(t.dtype == "bf16" for t in d[0])]
  assert logits, "Q K^T should take bfloat16 Q and K (accumulating in float32)"

  # The softmax over positions: exponentials of [B, M, M] (or [B, M, block]) logits.
  softmax_exps = [e for e in ops(text, "exponential") if len(e[1].shape) == 3]
  assert softmax_exps and all(e[1].dtype == "f32" for e in softmax_exps), softmax_exps


# The pooled grid of a SIZE x SIZE input (HRNet's stride 4, then the CIB's sc = 2) and C.
GRID_M, CHANNELS = (SIZE // 8) ** 2, 8


def _ifb_products(text: str) -> list:
  """The materialized IFB's products and their gradients: Co V and dV = Co^T g ([B, M, M] x
  [B, M, C] -> [B, M, C]), dCo = g V^T ([B, M, C] x [B, M, C] -> [B, M, M])."""
  square, values = (2, GRID_M, GRID_M), {(2, GRID_M, CHANNELS), (2, CHANNELS, GRID_M)}
  out = []
  for d in ops(text, "dot_general"):
    shapes = [t.shape for t in d[0]] + [d[1].shape]
    if shapes.count(square) == 1 and all(s in values for s in shapes if s != square):
      out.append(d)
  return out


@pytest.mark.parametrize("ifb_products, operands", [("model", "bf16"), ("float32", "f32")])
def test_bfloat16_ifb_products_take_the_asked_operands(ifb_products, operands):
  products = _ifb_products(_stablehlo("bfloat16", "materialized", ifb_products))
  # Two CIBs (semseg <-> depth): per CIB the forward's and the backward's loop bodies, dCo.
  assert len(products) >= 6, products
  assert all(t.dtype == operands for d in products for t in d[0]), products
  assert all(d[1].dtype == "f32" for d in products), products


def test_float32_step_has_no_bfloat16():
  text = _stablehlo("float32", "materialized")
  assert len(ops(text, "convolution")) > 100
  assert not re.search(r"tensor<[0-9x]*bf16>", text), "a float32 model computed in bfloat16"


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN convolutions: ITERFUSE_TEST_PLATFORM=gpu on a CUDA machine")
def test_compiled_gpu_step_runs_cudnn_convolutions_in_bfloat16():
  step, state, batch = _jitted_step_and_args("bfloat16", "materialized")
  hlo = step.lower(state, batch).compile().as_text()
  convs = re.findall(r"= \(?([a-z0-9]+)\[[^\n]*custom-call\(([^)]*)\)[^\n]*"
                     r"custom_call_target=\"__cudnn\$conv", hlo)
  assert convs, "no cuDNN convolution in the compiled step"
  not_bf16 = [c for c in convs if c[0] != "bf16" or "f32[" in c[1]]
  assert not not_bf16, (f"{len(not_bf16)} of {len(convs)} cuDNN convolutions not bf16: "
                        f"{not_bf16[:3]}")
