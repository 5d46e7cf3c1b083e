"""TensorBoard summaries without TensorFlow (`iterfuse_jax.summaries`): what clu's TensorFlow
writer writes, read back with tensorboard's loader; clear errors; the profile hook."""

import importlib.util
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax import summaries
from tests import tensorboard_events

RNG = np.random.default_rng(0)
SCALARS = {"loss/total": 1.25, "learning_rate": np.float32(3e-4), "eval/semseg/miou": jnp.array(17.5)}
IMAGES = {"eval/input": RNG.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8),
          "eval/depth/prediction": RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)}
HPARAMS = {"model.name": "iterfuse", "batch_size": 8, "optimizer.learning_rate": 1e-4,
           "model.tpim.enabled": True}


def _write(writer, step=3):
  writer.write_hparams(HPARAMS)
  writer.write_scalars(step, SCALARS)
  writer.write_images(step, IMAGES)
  writer.write_scalars(step + 1, {"loss/total": 1.0})
  writer.flush()
  writer.close()


def test_event_files_hold_the_scalars_pictures_and_hparams_as_written(tmp_path):
  _write(summaries.EventFileMetricWriter(str(tmp_path)))
  images = {}
  records = tensorboard_events.read(tmp_path, images)
  scalars = {(tag, step): v for tag, plugin, step, v in records if plugin == "scalars"}
  assert scalars == {("loss/total", 3): 1.25, ("learning_rate", 3): pytest.approx(3e-4),
                     ("eval/semseg/miou", 3): 17.5, ("loss/total", 4): 1.0}
  np.testing.assert_array_equal(images["eval/input", 3], IMAGES["eval/input"])
  np.testing.assert_array_equal(images["eval/depth/prediction", 3],
                                IMAGES["eval/depth/prediction"][None])
  assert {(tag, plugin) for tag, plugin, *_ in records if plugin == "hparams"} == {
      ("_hparams_/session_start_info", "hparams")}


def test_the_same_summaries_as_clus_tensorflow_writer(tmp_path):
  """Same tags, plugins, steps, numbers and pixels as clu's SummaryWriter (tf.summary)."""
  pytest.importorskip("tensorflow")
  from clu import metric_writers
  _write(summaries.EventFileMetricWriter(str(tmp_path / "ours")))
  _write(metric_writers.SummaryWriter(str(tmp_path / "clu")))
  ours_images, clu_images = {}, {}
  ours = tensorboard_events.read(tmp_path / "ours", ours_images)
  clu = tensorboard_events.read(tmp_path / "clu", clu_images)
  assert len(ours) == 7  # hparams, 4 scalars, 2 pictures
  assert sorted(ours) == sorted(clu)
  assert ours_images.keys() == clu_images.keys()
  for key, picture in clu_images.items():
    np.testing.assert_array_equal(ours_images[key], picture)


def test_logging_only_writes_no_file_and_logs_the_scalars(tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    writer = summaries.create_writer(str(tmp_path), just_logging=True, use_tensorflow=False)
    _write(writer)
  assert isinstance(writer, summaries.EventFileMetricWriter)
  assert not list(tmp_path.rglob("events.out.tfevents.*"))
  assert "[3] eval/semseg/miou=17.5, learning_rate=0.0003, loss/total=1.25" in caplog.text
  assert "[4] loss/total=1" in caplog.text


@pytest.mark.parametrize("scalars, images, message", [
    ({"loss/total": np.ones(2)}, {}, r"'loss/total' at step 1 has shape \(2,\); expected one"),
    ({}, {"eval/input": np.zeros((1, 4, 4, 3), np.float32)},
     r"'eval/input' at step 1 is float32 of shape \(1, 4, 4, 3\); expected uint8"),
    ({}, {"eval/input": np.zeros((4, 4), np.uint8)}, r"'eval/input' .* shape \(4, 4\)"),
])
def test_bad_summaries_name_the_key_and_what_was_expected(tmp_path, scalars, images, message):
  writer = summaries.EventFileMetricWriter(str(tmp_path))
  with pytest.raises(ValueError, match=message):
    writer.write_scalars(1, scalars)
    writer.write_images(1, images)
  writer.close()


def test_without_tensorflow_the_hooks_are_the_profile_alone(tmp_path):
  writer = summaries.EventFileMetricWriter(None)
  kwargs = dict(total_steps=10, log_every_steps=2, start_step=0, use_tensorflow=False)
  assert summaries.create_hooks(str(tmp_path), writer, profile_steps=0, **kwargs) == []
  (hook,) = summaries.create_hooks(str(tmp_path), writer, profile_steps=3, **kwargs)
  assert isinstance(hook, summaries.ProfileSteps)


def test_profile_hook_traces_the_steps_it_was_given(tmp_path):
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x.T))
  x = jnp.ones((8, 8))
  hook = summaries.ProfileSteps(str(tmp_path), first=2, count=2)  # steps 2 and 3
  for step in range(1, 6):
    x = step_fn(x)
    hook(step)
    traces = list(tmp_path.rglob("*.xplane.pb"))
    # Written when the trace stops, after step 3; nothing traced again afterwards.
    assert len(traces) == (0 if step < 3 else 1), step
  hook.close()  # nothing left to stop
  assert len(list(tmp_path.rglob("*.xplane.pb"))) == 1
  assert traces[0].stat().st_size > 0
  assert pathlib.Path(tmp_path, "plugins", "profile") in traces[0].parents


def test_profile_cut_short_by_the_end_of_the_run_is_closed(tmp_path):
  hook = summaries.ProfileSteps(str(tmp_path), first=2, count=50)
  jnp.ones(3).block_until_ready()
  hook(1)
  hook(2)
  assert not list(tmp_path.rglob("*.xplane.pb"))  # still tracing
  hook.close()
  assert len(list(tmp_path.rglob("*.xplane.pb"))) == 1


def test_a_tensorflow_that_does_not_import_counts_as_absent(monkeypatch, caplog, tmp_path):
  """Installed but broken (a CUDA or protobuf clash): a warning names the error, and the run
  writes its summaries without clu."""
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: object() if name == "tensorflow" else find_spec(name, *args))
  monkeypatch.setitem(sys.modules, "clu.metric_writers", None)  # its import fails
  with caplog.at_level(logging.WARNING):
    assert not summaries.clu_writers_usable()
  assert ("TensorFlow is installed but clu's writers do not import (ModuleNotFoundError: "
          "import of clu.metric_writers halted") in caplog.text
  writer = summaries.create_writer(str(tmp_path), just_logging=False)
  assert isinstance(writer, summaries.EventFileMetricWriter)
  writer.close()
