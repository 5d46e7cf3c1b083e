"""Prediction files in the survey's formats: encoding per task kind, the files as the survey's
evaluation reads them, agreement with what the evaluation scores, and errors naming the file."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io
from PIL import Image

from iterfuse_jax import eval_resizing, prediction_files


def test_encode_follows_the_survey_per_kind():
  logits = np.zeros((4, 6, 40), np.float32)
  logits[..., 7] = 1.0
  logits[0, 0, 39] = 5.0
  ids = prediction_files.encode("semseg", logits, (4, 6))
  assert ids.dtype == np.uint8 and ids.shape == (4, 6)
  assert ids[0, 0] == 39 and np.all(ids.ravel()[1:] == 7)

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no overflow warning for a logit of -1000
    sal = prediction_files.encode("sal", np.array([[[0.0], [50.0], [-1000.0]]], np.float32),
                                  (1, 3))
  np.testing.assert_array_equal(sal, [[127, 255, 0]])  # 255 * sigmoid, truncated: 127.5 -> 127
  edge = prediction_files.encode("edge", np.full((4, 6, 1), -2.0, np.float32), (9, 13))
  assert edge.shape == (9, 13) and np.all(edge == int(255 / (1 + np.exp(2.0))))

  depth = prediction_files.encode("depth", np.full((4, 6, 1), -0.25, np.float32), (8, 12))
  # The raw regression, negative values included: the scoring clamps, as the survey's does.
  assert depth.dtype == np.float32 and depth.shape == (8, 12) and np.all(depth == -0.25)

  normals = np.zeros((2, 2, 3), np.float32)
  normals[..., 2] = 2.0  # length 2: normalised to (0, 0, 1) before the 8-bit encoding
  normals[1, 1] = (0.0, -3.0, 0.0)
  encoded = prediction_files.encode("normals", normals, (2, 2))
  assert encoded.dtype == np.uint8 and encoded.shape == (2, 2, 3)
  np.testing.assert_array_equal(encoded[0, 0], [127, 127, 255])
  np.testing.assert_array_equal(encoded[1, 1], [127, 0, 127])


def test_encode_refuses_outputs_it_cannot_write():
  with pytest.raises(ValueError, match=r"sal output must have 1 channel\(s\)"):
    prediction_files.encode("sal", np.zeros((4, 4, 2)), (4, 4))
  with pytest.raises(ValueError, match="300 classes; a uint8 PNG holds at most 256"):
    prediction_files.encode("semseg", np.zeros((4, 4, 300)), (4, 4))
  with pytest.raises(ValueError, match=r"depth output must be \[h, w, C\]"):
    prediction_files.encode("depth", np.zeros((4, 4)), (4, 4))
  with pytest.raises(ValueError, match="unknown task 'albedo'"):
    prediction_files.encode("albedo", np.zeros((4, 4, 1)), (4, 4))


@pytest.mark.parametrize("task,dataset", [("semseg", "pascal"), ("human_parts", "pascal"),
                                          ("sal", "pascal"), ("depth", "nyud")])
def test_files_hold_what_the_evaluation_scores(task, dataset):
  """At PASCAL-like sizes (the network's 36x36 output to originals from 20x28 to 36x36, among
  them 20 and 28, where OpenCV's rounding moves a nearest-neighbour index), the file of each image
  decodes to the prediction the evaluation scores (eval_resizing, the survey order): class ids
  equal, 8-bit saliency levels equal but where the two linear resizes round differently (<= 1
  level), depth to float rounding."""
  from iterfuse_jax import tasks
  channels = tasks.num_outputs(task, dataset)
  outputs = jax.random.normal(jax.random.key(0), (4, 36, 36, channels), jnp.float32) * 3
  sizes = np.array([[20, 28], [36, 36], [28, 33], [33, 20]], np.int32)
  canvas = (36, 36)
  scored, decoded = jax.jit(eval_resizing.eval_predictions, static_argnums=(2, 3))(
      {task: outputs}, jnp.asarray(sizes), canvas, (task,))
  assert decoded
  scored = np.asarray(scored[task])
  for b, (h, w) in enumerate(sizes):
    array = prediction_files.encode(task, np.asarray(outputs[b]), (h, w))
    mine = prediction_files.metric_input(task, array)
    theirs = scored[b, :h, :w]
    if task in ("semseg", "human_parts"):
      np.testing.assert_array_equal(mine, theirs, err_msg=f"{h}x{w}")
    elif task == "sal":
      levels = np.abs(np.round(mine * 255) - np.round(theirs * 255))
      assert levels.max() <= 1 and np.mean(levels) < 0.01, (h, w, np.mean(levels))
    else:
      np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4, err_msg=f"{h}x{w}")


def test_files_are_the_survey_formats_and_read_back(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"semseg": rng.integers(0, 40, (5, 7), dtype=np.uint8),
            "sal": rng.integers(0, 256, (5, 7), dtype=np.uint8),
            "depth": rng.uniform(-1, 10, (5, 7)).astype(np.float32),
            "normals": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)}
  for task, array in arrays.items():
    path = prediction_files.write(tmp_path, task, "2008_000123", array)
    assert path == tmp_path / task / f"2008_000123{'.mat' if task == 'depth' else '.png'}"
    np.testing.assert_array_equal(prediction_files.read(tmp_path, task, "2008_000123", (5, 7)),
                                  array)
  # As the survey's evaluation reads them: sio.loadmat(...)["depth"], 8-bit PNGs.
  np.testing.assert_array_equal(scipy.io.loadmat(tmp_path / "depth" / "2008_000123.mat")["depth"],
                                arrays["depth"])
  with Image.open(tmp_path / "semseg" / "2008_000123.png") as image:
    assert image.mode == "L"
  with Image.open(tmp_path / "normals" / "2008_000123.png") as image:
    assert image.mode == "RGB"
  np.testing.assert_allclose(prediction_files.metric_input("normals", arrays["normals"]),
                             arrays["normals"].astype(np.float64) * 2 / 255 - 1, atol=1e-6)


def test_bad_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"semseg prediction of image 'x' not found: .*"
                                              r"semseg/x\.png"):
    prediction_files.read(tmp_path, "semseg", "x", (5, 7))
  prediction_files.write(tmp_path, "semseg", "x", np.zeros((5, 6), np.uint8))
  with pytest.raises(ValueError, match=r"semseg/x\.png has shape \(5, 6\), but image 'x' is "
                                       r"5x7: expected \(5, 7\)"):
    prediction_files.read(tmp_path, "semseg", "x", (5, 7))
  with pytest.raises(ValueError, match=r"semseg predictions are 8-bit PNGs; got a int32 array"):
    prediction_files.write(tmp_path, "semseg", "w", np.zeros((5, 7), np.int32))
  Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "semseg" / "y.png")
  with pytest.raises(ValueError, match=r"y\.png is a RGB PNG; semseg predictions are L"):
    prediction_files.read(tmp_path, "semseg", "y", (5, 7))
  (tmp_path / "depth").mkdir()
  scipy.io.savemat(tmp_path / "depth" / "z.mat", {"pred": np.zeros((5, 7))})
  with pytest.raises(ValueError, match=r"z\.mat has no variable 'depth' \(it has \['pred'\]\)"):
    prediction_files.read(tmp_path, "depth", "z", (5, 7))


def test_which_labels_score_something():
  score = prediction_files._scores_something  # pylint: disable=protected-access
  assert not score("human_parts", np.full((3, 4), 255, np.uint8))
  assert score("human_parts", np.pad(np.zeros((1, 1), np.uint8), 1, constant_values=255))
  assert not score("depth", np.zeros((3, 4), np.float32)) and score("depth", np.ones((3, 4)))
  assert not score("normals", np.zeros((3, 4, 3))) and score("normals", np.ones((3, 4, 3)))


def test_cli_scores_a_folder_of_files_against_the_runs_split(tmp_path):
  """What a user runs on our files or on a PyTorch run's save_dir: perfect predictions written
  from the labels themselves score 100 % / 0 m (normals: their 8-bit encoding's error), and a
  missing file of an image that has labels is an error naming it."""
  import json
  import os
  import pathlib
  import subprocess
  import sys

  from configs import demo_rows
  from data_pipelines import nyud, synthetic
  data_dir = tmp_path / "NYUD_MT"
  synthetic.write_nyud(str(data_dir), num_train=1, num_val=2, seed=0, height=48, width=64)
  config = demo_rows.get_config("nyud_full_ifbC")
  config.unlock()
  config.dataset.data_dir = str(data_dir)
  config.dataset.tasks = ("semseg", "depth", "normals")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  ids = nyud.split_ids(str(data_dir), "val")
  for image_id in ids:
    labels = nyud.read_example(str(data_dir), image_id, ("semseg", "depth", "normals"))
    directory = workdir / prediction_files.WORKDIR_SUBDIR
    semseg = labels["semseg"]
    prediction_files.write(directory, "semseg", image_id, np.where(semseg == 255, 0, semseg))
    prediction_files.write(directory, "depth", image_id, labels["depth"])
    normals = np.floor((labels["normals"] + 1) * 255 / 2).astype(np.uint8)
    prediction_files.write(directory, "normals", image_id, normals)
  command = [sys.executable, "-m", "iterfuse_jax.prediction_files", str(workdir)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env,
                          check=False)
  assert result.returncode == 0, result.stderr
  scores = json.loads(result.stdout)
  assert scores["semseg/pixel_acc"] == 100 and scores["depth/rmse"] == 0
  assert 0 < scores["normals/mean_angle"] < 0.5  # 8 bits per component
  assert scores["delta_m_tasks"] == 2 and np.isfinite(scores["delta_m"])
  # A class id NYUD-v2 does not have (e.g. a file of another dataset's model) is named.
  semseg = prediction_files.read(directory, "semseg", ids[0], (48, 64)).copy()
  semseg[3, 5] = 40
  prediction_files.write(directory, "semseg", ids[0], semseg)
  result = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env,
                          check=False)
  assert result.returncode == 1
  assert f"semseg/{ids[0]}.png holds class id 40, but semseg on nyud has classes 0..39" in (
      result.stderr)
  semseg[3, 5] = 0
  prediction_files.write(directory, "semseg", ids[0], semseg)
  os.remove(workdir / "predictions" / "depth" / f"{ids[1]}.mat")
  result = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env,
                          check=False)
  assert result.returncode == 1
  assert f"depth prediction of image '{ids[1]}' not found" in result.stderr
  assert f"depth/{ids[1]}.mat" in result.stderr
