"""Boundary evaluation without MATLAB: odsF of crafted predictions, SEISM's rules, files, CLI."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from iterfuse_jax import boundary_eval

REPO = pathlib.Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 120, 160  # diagonal 200 pixels: max_dist 0.011 -> 2.2 pixels


def lines() -> np.ndarray:
  """A horizontal and a vertical boundary that do not touch."""
  gt = np.zeros((HEIGHT, WIDTH), bool)
  gt[40, 20:120] = True
  gt[60:110, 140] = True
  return gt


def shifted(gt: np.ndarray, pixels: int, value: int = 230) -> np.ndarray:
  """A uint8 prediction: the boundaries moved `pixels` to the right."""
  pred = np.zeros(gt.shape, np.uint8)
  pred[:, pixels:] = np.where(gt[:, :gt.shape[1] - pixels], value, 0)
  return pred


def ods(prediction, gt, max_dist=0.011):
  return boundary_eval.summarize(boundary_eval.image_counts(prediction, gt,
                                                            max_dist=max_dist)[None])


# The BSDS correspondence is randomised (module docstring): a full match may leave one of the
# 150 boundary pixels here unmatched, so "perfect" means odsF >= 100 * (1 - 1/150) - a little.
PERFECT = 99.3


def test_survey_settings():
  assert len(boundary_eval.SURVEY_THRESHOLDS) == 99
  assert boundary_eval.SURVEY_THRESHOLDS[:2] == (0.01, 0.02)
  assert boundary_eval.SURVEY_THRESHOLDS[-1] == 0.99
  assert boundary_eval.MAX_DIST == {"nyud": 0.011, "pascal": 0.0075}
  assert boundary_eval.max_dist_for("pascal") == 0.0075
  assert boundary_eval.max_dist_for("nyud", override=0.02) == 0.02


def test_odsf_of_perfect_shifted_and_empty_predictions():
  gt = lines()
  assert ods(shifted(gt, 0), gt)["odsF"] >= PERFECT
  # Within the matching distance (2.2 pixels here) a shifted boundary still matches fully.
  for pixels in (1, 2):
    assert ods(shifted(gt, pixels), gt)["odsF"] >= PERFECT
  # Past it, the vertical line no longer matches (a third of the boundary: odsF about 67), and
  # the horizontal one loses a pixel at its end per pixel of shift: odsF falls further.
  beyond = [ods(shifted(gt, pixels), gt)["odsF"] for pixels in (3, 6, 12, 18)]
  assert beyond[0] < 68 and all(a > b + 1 for a, b in zip(beyond, beyond[1:])), beyond
  # A smaller matching distance (1.5 pixels) fails earlier.
  assert ods(shifted(gt, 2), gt, max_dist=0.0075)["odsF"] < 68
  # Nothing predicted: precision 1, recall 0 at every threshold -> odsF 0.
  empty = ods(np.zeros(gt.shape, np.uint8), gt)
  assert empty["odsF"] == 0.0 and empty["ods_recall"] == 0.0 and empty["oisF"] == 0.0


def test_thresholds_binarise_before_thinning():
  gt = lines()
  # A 5-pixel-wide soft ridge around each boundary: thinned at each threshold to a line that
  # matches; the best threshold is one at which the ridge is one connected band.
  pred = np.zeros(gt.shape, np.float64)
  for offset, strength in ((-2, 60), (-1, 140), (0, 250), (1, 140), (2, 60)):
    pred = np.maximum(pred, np.roll(gt, offset, axis=0) * strength)
    pred = np.maximum(pred, np.roll(gt, offset, axis=1) * strength)
  result = ods(pred.astype(np.uint8), gt)
  assert result["odsF"] > 95
  # Weak noise below the best threshold does not matter; above every threshold it costs
  # precision.
  noise = np.zeros(gt.shape, np.uint8)
  noise[::7, ::9] = 255
  assert ods(np.maximum(pred, noise).astype(np.uint8), gt)["odsF"] < result["odsF"]


def test_split_sums_and_seism_conventions():
  thresholds = (0.5,)
  # Image A: 10 ground-truth pixels, 8 matched; 20 predicted, 8 matched.
  # Image B: no ground truth, 5 predicted pixels (all false positives).
  counts = np.array([[[8.0], [10.0], [8.0], [20.0]],
                     [[0.0], [0.0], [0.0], [5.0]]])
  got = boundary_eval.summarize(counts, thresholds)
  precision, recall = 8 / 25, 8 / 10
  assert got["odsF"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
  assert got["ods_precision"] == pytest.approx(100 * precision)
  # oisF: image A's F, image B's (no ground truth: recall 1, precision 0) F = 0.
  f_a = 2 * 0.4 * 0.8 / 1.2
  assert got["oisF"] == pytest.approx(100 * f_a / 2)
  with pytest.raises(ValueError, match="no image"):
    boundary_eval.summarize(np.zeros((0, 4, 1)), thresholds)


def _write_predictions(directory, items):
  directory.mkdir(parents=True, exist_ok=True)
  for image_id, pred in items.items():
    Image.fromarray(pred, mode="L").save(directory / f"{image_id}.png")


def test_evaluate_directory_in_processes_equals_in_process(tmp_path):
  gt = lines()
  predictions = {"a": shifted(gt, 0), "b": shifted(gt, 6), "c": np.zeros(gt.shape, np.uint8)}
  _write_predictions(tmp_path / "pred", predictions)
  pairs = [(image_id, gt) for image_id in predictions]
  here = boundary_eval.evaluate_directory(tmp_path / "pred", pairs, max_dist=0.011,
                                          num_workers=0)
  spawned = boundary_eval.evaluate_directory(tmp_path / "pred", pairs, max_dist=0.011,
                                             num_workers=2, total=3)
  assert here["num_images"] == spawned["num_images"] == 3
  # Same scores up to the matcher's randomness (a pixel or two of 900).
  for key in ("odsF", "oisF"):
    assert here[key] == pytest.approx(spawned[key], abs=0.5), key
  # a: all 150 pixels match; b: the horizontal line matched 2 pixels off, 97 of its pixels;
  # c: nothing. 300 predicted, 450 ground-truth pixels: odsF = 2 * 247 / (300 + 450).
  assert here["odsF"] == pytest.approx(100 * 2 * 247 / 750, abs=0.5)
  assert here["seconds_per_image"] > 0
  with pytest.raises(FileNotFoundError,
                     match=r"edge prediction of image 'zz' not found: .*zz\.png"):
    boundary_eval.evaluate_directory(tmp_path / "pred", [("zz", gt)], max_dist=0.011,
                                     num_workers=0)
  with pytest.raises(ValueError, match=r"a\.png is 120x160 but its ground truth is 10x10"):
    boundary_eval.evaluate_directory(tmp_path / "pred", [("a", gt[:10, :10])], max_dist=0.011,
                                     num_workers=0)


def test_cli_scores_a_workdir_against_its_dataset(tmp_path):
  """What a user runs after training: the saved predictions of a workdir against its split."""
  from configs import demo_rows
  from data_pipelines import builders, nyud, synthetic
  data_dir = tmp_path / "NYUD_MT"
  synthetic.write_nyud(str(data_dir), num_train=1, num_val=2, seed=0, height=48, width=64)
  config = demo_rows.get_config("nyud_full_ifbC")
  config.unlock()
  config.dataset.data_dir = str(data_dir)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  ids = nyud.split_ids(str(data_dir), "val")
  assert builders.BOUNDARY_GT_FEATURE["nyud"] == "edge"
  edges = {i: nyud.read_example(str(data_dir), i, ("edge",))["edge"] for i in ids}
  _write_predictions(workdir / "predictions" / "edge", {i: e * 255 for i, e in edges.items()})
  command = [sys.executable, "-m", "iterfuse_jax.boundary_eval", str(workdir), "--num-workers",
             "0"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                          check=False)
  assert result.returncode == 0, result.stderr
  scores = json.loads(result.stdout)
  assert scores["edge/odsF"] >= 99 and scores["edge/num_images"] == 2  # thin ground truth
  # A missing prediction is an error naming the file.
  os.remove(workdir / "predictions" / "edge" / f"{ids[1]}.png")
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                          check=False)
  assert result.returncode == 1 and f"{ids[1]}.png" in result.stderr


# One process with 2 CPU devices, or process `argv[3]` of 2 with one each: the eval split's edge
# predictions of a stand-in model (each pixel's channel mean: every image its own map) are saved
# and scored as after training. Prints the results as JSON.
_PREDICT_AND_SCORE = """
import json, sys
import jax, ml_collections, numpy as np
config_json, workdir = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
  jax.distributed.initialize(sys.argv[4], num_processes=2, process_id=int(sys.argv[3]))
from jax.sharding import NamedSharding, PartitionSpec
from iterfuse_jax import boundary_eval, train
config = ml_collections.ConfigDict(json.loads(config_json))
sharding = NamedSharding(train.create_mesh(), PartitionSpec("data"))
edge_logits = jax.jit(lambda images: 8 * images.mean(-1, keepdims=True), out_shardings=sharding)

def predict(images):
  return train.host_rows(edge_logits(train.shard_batch({"image": images}, sharding)["image"]))

results = boundary_eval.run(config, workdir, train.create_eval_batches(config), predict)
print(json.dumps({k: v for k, v in results.items() if k != "edge/seconds_per_image"}))
"""


@pytest.mark.slow
def test_two_processes_save_their_own_predictions_and_score_the_same_as_one(tmp_path):
  """Each process saved the replicated predictions' first rows, process 0's, under its own image
  ids, and only process 0 scored them (the others returned {}, and their evaluation records
  then differed from process 0's)."""
  from configs import demo_rows
  from data_pipelines import pipeline, synthetic
  from tests import multiprocess

  data_dir = tmp_path / "NYUD_MT"
  synthetic.write_nyud(str(data_dir), num_train=1, num_val=6, seed=0, height=48, width=64)
  config = demo_rows.get_config("nyud_full_ifbC")
  config.unlock()
  config.dataset.data_dir = str(data_dir)
  config.dataset.eval_size = config.dataset.eval_label_size = (48, 64)
  config.batch_size = 4  # 2 batches of 4 slots for 6 images: padding in the last one
  config.boundary_eval.num_workers = 0
  pipeline.load_source(config.dataset, config.dataset.eval_split)  # prepared once, here
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  script = [sys.executable, "-c", _PREDICT_AND_SCORE, config.to_json()]

  one = subprocess.run([*script, str(tmp_path / "one")], cwd=REPO, capture_output=True,
                       text=True, env={**env, "JAX_NUM_CPU_DEVICES": "2"}, timeout=600)
  assert one.returncode == 0, one.stderr[-5000:]
  coordinator = f"localhost:{multiprocess.free_port()}"
  processes = multiprocess.start(
      [[*script, str(tmp_path / "two"), str(i), coordinator] for i in range(2)],
      env={"JAX_PLATFORMS": "cpu"})
  outputs = multiprocess.finish(processes, timeout=600)
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-5000:]

  expected = json.loads(one.stdout.splitlines()[-1])
  results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
  assert results[0] == results[1]  # the same gathered counts in both processes
  assert expected["edge/num_images"] == results[0]["edge/num_images"] == 6
  # The same up to the matcher's randomness (module docstring).
  for key in ("edge/odsF", "edge/oisF"):
    assert results[0][key] == pytest.approx(expected[key], abs=0.5), key
  saved = {run: {p.name: p.read_bytes()
                 for p in (tmp_path / run / boundary_eval.PREDICTIONS_SUBDIR).glob("*.png")}
           for run in ("one", "two")}
  assert len(saved["one"]) == 6 and saved["two"] == saved["one"]
