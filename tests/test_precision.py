"""model.dtype is obeyed: what the compiled train step computes in bfloat16 and what in float32.

With model.dtype = "bfloat16" the step must run every convolution and the resize products on
bfloat16 operands, while the attention logits accumulate in float32, the softmax over positions
stays float32, and every IFB product (Co V and its gradients) accumulates in float32: on bfloat16
operands by default (model.tpim.ifb_products="model", as PyTorch autocast), on float32 ones with
ifb_products="float32". With "float32" nothing may be bfloat16. These are read off the step's
StableHLO (what JAX asks XLA to compute) on any backend; on a GPU (ITERFUSE_TEST_PLATFORM=gpu)
also off the optimised HLO that XLA compiled, where the convolutions are cuDNN calls (and the
bf16 streamed IFB's attention is cuDNN's fused kernels). A model that ignored model.dtype fails
here, whatever its losses.
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
  # w18_tiny: the same kinds of layers as W18-Small-v2 (236 convolutions in the train step
  # against 509), lowered in 6 s instead of 14 and compiled in 36 s instead of 66 on a 2-core
  # CPU; on a GPU visit the compiled test is one of the first.
  return bench.Setting(framework="jax", impl=impl, dataset="nyud", height=SIZE, width=SIZE,
                       batch=2, n_iter=2, variant="C", task_channels=8, dtype=dtype, steps=1,
                       warmup=0, ifb_products=ifb_products, backbone="w18_tiny")


def _jitted_step_and_args(dtype: str, impl: str, ifb_products: str = "model"):
  """The benchmark's jitted train step and abstract arguments (nothing is initialised)."""
  config = bench.benchmark_config(_setting(dtype, impl, ifb_products))
  model = build_model(config)
  schedule = train.create_learning_rate_schedule(config, 10)
  tx = train.create_optimizer(config, schedule)
  mesh = train.create_mesh(1)
  state = train.abstract_train_state(config, model, tx, (1, SIZE, SIZE, 3), mesh)
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


def custom_calls(text: str, prefix: str) -> list[tuple[str, list[Tensor]]]:
  """(target, operand types) of every `stablehlo.custom_call @<prefix>...` in a module's text."""
  out = []
  # The target may be printed quoted (@"name") where it has characters MLIR's bare names lack.
  pattern = rf"stablehlo\.custom_call @\"?({re.escape(prefix)}[^\"(\s]*)\"?\([^\n]*?: \(([^)]*)\)"
  for m in re.finditer(pattern, text):
    out.append((m.group(1), [_tensor(t) for t in re.findall(r"tensor<([^>]*)>", m.group(2))]))
  return out


def test_custom_calls_reads_targets_and_operand_types():
  # LAPACK's LU and triangular solves: custom calls on any CPU, in the same printed form. Lowered
  # for the CPU whatever the test platform (on a GPU the same inverse is cuSOLVER's call).
  traced = jax.jit(jax.numpy.linalg.inv).trace(jax.numpy.ones((2, 4, 4)))
  text = traced.lower(lowering_platforms=("cpu",)).as_text()
  calls = custom_calls(text, "lapack_")
  assert calls and all(name.startswith("lapack_") for name, _ in calls), calls
  assert all(operands and all(t == Tensor((2, 4, 4), "f32") for t in operands)
             for _, operands in calls), calls
  assert custom_calls(text, "__cudnn$fmha") == []


def _streamed_attention_is_cudnn() -> bool:
  """Whether the bf16 streamed IFB of _setting runs cuDNN's fused attention (on a CUDA GPU)."""
  return jax.default_backend() == "gpu"


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
  assert all(d[1].dtype == "f32" for d in ifb_dots), [d for d in ifb_dots if d[1].dtype != "f32"]
  # The softmax over positions: exponentials of [B, M, M] (or [B, M, block]) logits.
  softmax_exps = [e for e in ops(text, "exponential") if len(e[1].shape) == 3]
  assert all(e[1].dtype == "f32" for e in softmax_exps), softmax_exps

  if impl == "streamed" and _streamed_attention_is_cudnn():
    # On a GPU the streamed IFB hands the whole attention to cuDNN's fused kernels (softmax and
    # accumulation in float32 inside them): forward and backward calls on bfloat16 Q, K, V, and
    # no attention products or softmax of its own.
    fused = custom_calls(text, "__cudnn$fmha")
    targets = collections.Counter(name for name, _ in fused)
    assert targets["__cudnn$fmhaSoftmax"] >= 2 and targets["__cudnn$fmhaSoftmaxBackward"] >= 2, (
        targets)
    assert all(t.dtype == "bf16" for _, operands in fused for t in operands[:3]), fused
    assert not ifb_dots and not softmax_exps, (ifb_dots[:3], softmax_exps[:3])
    return
  assert ifb_dots, "no attention / IFB products found"
  logits = [d for d in ifb_dots if all(t.dtype == "bf16" for t in d[0])]
  assert logits, "Q K^T should take bfloat16 Q and K (accumulating in float32)"
  assert softmax_exps, "no softmax over positions found"


# The pooled grid of a SIZE x SIZE input (HRNet's stride 4, then the CIB's sc = 2) and C.
GRID_M, CHANNELS = (SIZE // 8) ** 2, 8


def _ifb_products(text: str) -> list:
  """The materialized IFB's products and their gradients: Co V and dV = Co^T g ([B, M, M] x
  [B, M, C] -> [B, M, C]), dCo = sum_t g_t V_t^T ([n_iter, B, M, C] x [n_iter, B, M, C] ->
  [B, M, M], the stacked backward; per iteration [B, M, C] x [B, M, C] under "autodiff")."""
  n_iter = _setting("bfloat16", "materialized").n_iter
  square = (2, GRID_M, GRID_M)
  values = {(2, GRID_M, CHANNELS), (2, CHANNELS, GRID_M), (n_iter, 2, GRID_M, CHANNELS)}
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
  assert sum(len(d[0][0].shape) == 4 for d in products) == 2, "one stacked dCo per CIB"
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
