"""An out-of-memory failure of a materialized-IFB model names the streamed option."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from benchmarks import train_step as bench
from iterfuse_jax import out_of_memory, train
from iterfuse_jax.models import build_model


def _config(impl: str = "materialized", height: int = 480, width: int = 640, scale: int = 1):
  setting = bench.Setting(framework="jax", impl=impl, dataset="nyud", height=height, width=width,
                          batch=8, n_iter=18, variant="C", task_channels=270, dtype="float32",
                          steps=1, warmup=0)
  config = bench.benchmark_config(setting)
  config.model.tpim.scale = scale
  return config


def _raise_oom(*args, **kwargs):
  del args, kwargs
  raise jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 94371840000 bytes.")


def test_message_gives_the_size_of_co_and_names_the_option():
  step = out_of_memory.with_hint(_raise_oom, _config())
  with pytest.raises(out_of_memory.IFBOutOfMemoryError) as info:
    step()
  message = str(info.value)
  assert "model.tpim.ifb_impl=streamed" in message
  assert "--config.model.tpim.ifb_impl=streamed" in message
  # NYUD 480x640 at sc = 1: a 120x160 grid, M = 19200; 2 task pairs, batch 8, float32.
  assert "M = 19200 positions" in message and "2 task pairs" in message
  assert f"{8 * 2 * 19200 ** 2 * 4 / 2 ** 30:.1f} GiB for a batch of 8" in message
  assert "RESOURCE_EXHAUSTED: Out of memory while trying to allocate" in message
  assert "\n" not in message  # one line: the benchmark's error rows and logs show all of it
  assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)


@pytest.mark.parametrize("change", ["streamed", "no_ifb", "other_error", "other_model"])
def test_other_failures_pass_through_unchanged(change):
  config = _config("streamed" if change == "streamed" else "materialized")
  failure = _raise_oom
  if change == "no_ifb":
    config.model.tpim.use_ifb = False
  elif change == "other_model":
    config.model.name = "padnet"
  elif change == "other_error":
    def failure():
      raise jax.errors.JaxRuntimeError("INTERNAL: cuDNN failed")
  with pytest.raises(jax.errors.JaxRuntimeError):
    out_of_memory.with_hint(failure, config)()


def test_positions_follow_size_and_scale():
  assert out_of_memory.affinity_positions(_config(scale=2)) == 60 * 80
  assert out_of_memory.affinity_positions(_config(height=512, width=512, scale=1)) == 128 * 128
  assert out_of_memory.affinity_positions(_config(height=50, width=70, scale=2)) == 7 * 9


def _overcommit_refuses_huge_allocations() -> bool:
  try:
    with open("/proc/sys/vm/overcommit_memory", encoding="ascii") as f:
      return f.read().strip() in ("0", "2")  # heuristic or strict: a 4 TiB mmap fails at once
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu" or not _overcommit_refuses_huge_allocations(),
                    reason="needs XLA's CPU runtime on Linux with overcommit_memory 0 or 2")
def test_real_xla_out_of_memory_of_the_train_step_is_explained():
  """A real RESOURCE_EXHAUSTED from XLA: Co of a 2**20-position grid (4 TiB) cannot be allocated.

  The state is initialised at 32x32 (parameters do not depend on the image size); the train step
  then gets one 8192x2048 image, a 2048x512 feature grid at sc = 1. XLA's CPU runtime fails the
  allocation of the step's scratch memory before computing anything, and reports it only when the
  result is read: `with_hint` waits for the first step's result.
  """
  config = ml_collections.ConfigDict(_config(height=32, width=32).to_dict())
  config.model.task_channels = 4
  config.model.tpim.n_iter = 1
  config.model.backbone = "w18_tiny"  # what fails is the IFB's Co, not the backbone
  config.batch_size = 1
  tasks = tuple(config.dataset.tasks)
  model = build_model(config)
  schedule = train.create_learning_rate_schedule(config, 10)
  mesh = train.create_mesh(1)
  # Zeros of the state's shapes: the step fails before computing, so no initialisation (and no
  # compilation of it) is needed; XLA's cheap passes keep Co materialized all the same.
  abstract = train.abstract_train_state(config, model, train.create_optimizer(config, schedule),
                                        (1, 32, 32, 3), mesh)
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  config.dataset.train_size = (8192, 2048)
  batch = bench.random_batch("nyud", tasks, 1, 8192, 2048, 0)
  step = jax.jit(functools.partial(train.train_step, tasks=tasks,
                                   loss_weights=dict(config.loss_weights), schedule=schedule))
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    with pytest.raises(out_of_memory.IFBOutOfMemoryError,
                       match=r"M = 1048576 positions.*model\.tpim\.ifb_impl=streamed") as info:
      out_of_memory.with_hint(step, config)(state, batch)
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  assert "RESOURCE_EXHAUSTED" in str(info.value.__cause__)
