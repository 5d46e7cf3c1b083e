"""The survey's full task sets end to end: 4 tasks on NYUD-v2 and 5 on PASCAL-Context train a step,
evaluate (normals online, edge odsF over the saved predictions) and land in the comparison."""

import json

import flax
import jax
import ml_collections
import numpy as np
import pytest

from configs import demo_rows
from data_pipelines import synthetic
from iterfuse_jax import compare, prediction_files, tasks, train
from iterfuse_jax.models import build_model

SIZE = (48, 64)


def tiny_full_config(dataset: str, data_dir: str) -> ml_collections.ConfigDict:
  """The demo's full-task IterFuse row shrunk to seconds of compute (compiling dominates)."""
  config = ml_collections.ConfigDict(demo_rows.get_config(f"{dataset}_full_ifbC").to_dict())
  config.dataset.data_dir = data_dir
  config.dataset.train_size = config.dataset.eval_size = config.dataset.eval_label_size = SIZE
  config.synthetic_data.enabled = False
  config.model.backbone = "w18_tiny"  # as configs/demo.py:tiny: the same branches, faster compiles
  config.model.task_channels = 8
  config.model.tpim.n_iter = 2
  config.batch_size = 2
  config.num_train_steps = 1
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  config.eval_every_steps = 1000
  config.num_eval_images = 1
  config.num_devices = 1
  config.boundary_eval.num_workers = 0
  return config


@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_cib_count_scales_with_the_number_of_tasks(dataset):
  config = tiny_full_config(dataset, "")
  model = build_model(config)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                             jax.ShapeDtypeStruct((1, *SIZE, 3), np.float32))
  cibs = set()
  for path in flax.traverse_util.flatten_dict(variables["params"]):
    cibs |= {p for p in path if p.startswith("cib_")}
  n = len(tasks.FULL_TASKS[dataset])
  assert len(cibs) == n * (n - 1) == {"nyud": 12, "pascal": 20}[dataset]
  outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                           jax.ShapeDtypeStruct((1, *SIZE, 3), np.float32))
  channels = {t: o.shape[-1] for t, o in outputs["final"].items()}
  assert channels["normals"] == 3 and channels["edge"] == 1


@pytest.mark.slow  # two train-step compiles of 4- and 5-task IterFuse: ~2-4 minutes each here
@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_full_task_network_trains_a_step_and_evaluates(dataset, tmp_path):
  data_dir = tmp_path / "data"
  writer = {"nyud": synthetic.write_nyud, "pascal": synthetic.write_pascal}[dataset]
  writer(str(data_dir), num_train=2, num_val=2, seed=0, height=SIZE[0], width=SIZE[1])
  config = tiny_full_config(dataset, str(data_dir))
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, str(workdir))

  full = tasks.FULL_TASKS[dataset]
  assert {"normals/mean_angle", "normals/median_angle", "normals/within_11.25", "edge/loss",
          "edge/odsF", "edge/oisF", "edge/seconds_per_image"} <= set(results)
  assert 0 <= results["edge/odsF"] <= 100 and 0 <= results["normals/mean_angle"] <= 180
  assert results["edge/num_images"] == 2
  # The paper has no STL reference for normals and edges: Delta_m over the other tasks.
  assert results["delta_m_tasks"] == len(full) - 2 and np.isfinite(results["delta_m"])
  saved = json.loads((workdir / "metrics.json").read_text())
  assert saved["edge/odsF"] == results["edge/odsF"]
  predictions = sorted(p.name for p in (workdir / "predictions" / "edge").glob("*.png"))
  assert len(predictions) == 2
  if dataset == "pascal":
    _prediction_files_score_as_the_evaluation(config, workdir)

  # The comparison table has a column per task; without a full-task STL run it says what to add.
  run = compare.load_run(workdir)
  with pytest.raises(compare.CompareError, match=f"configs/{dataset}_full_stl.py"):
    compare.comparison_table([run])
  # The table reports the best evaluation (compare's default), with its own boundary metrics.
  saved = json.loads((workdir / "metrics_best.json").read_text())
  assert saved["edge/odsF"] > 0  # at threshold 0.01 an untrained map predicts edges everywhere
  # A hand-made STL run: the paper tasks at 10 (mIoU, maxIoU) / the run's own RMSE, normals at
  # twice the run's angle (the run is +50 % better), edge at half its odsF (+100 %).
  keys = {"semseg": "semseg/miou", "human_parts": "human_parts/miou", "sal": "sal/max_iou",
          "depth": "depth/rmse", "normals": "normals/mean_angle", "edge": "edge/odsF"}
  references = {"semseg": 10.0, "human_parts": 10.0, "sal": 10.0,
                "depth": saved.get("depth/rmse", 1.0),
                "normals": 2 * saved["normals/mean_angle"], "edge": saved["edge/odsF"] / 2}
  stl = workdir.parent / "stl"
  stl.mkdir()
  stl_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  stl_config.model.name = "stl"
  (stl / "config.json").write_text(stl_config.to_json_best_effort())
  (stl / "metrics_best.json").write_text(json.dumps({keys[t]: references[t] for t in full}))
  table = compare.comparison_table([run, compare.load_run(stl)])
  assert "Normals ↓" in table and "Edge ↑" in table
  row = [c.strip() for c in next(line for line in table.splitlines()
                                 if line.startswith("| Ours")).strip("|").split("|")]
  higher = {"semseg": 1, "human_parts": 1, "sal": 1, "depth": -1, "normals": -1, "edge": 1}
  expected = 100 / len(full) * sum(
      higher[t] * (saved[keys[t]] - references[t]) / references[t] for t in full)
  assert row[2 + len(full)] == f"{expected:+.2f}"
  assert row[2 + full.index("normals")] == f"{saved['normals/mean_angle']:.4f}"


def _prediction_files_score_as_the_evaluation(config, workdir):
  """`--mode eval --save_predictions` on PASCAL-Context's five tasks, whose synthetic images vary
  in size (down to 7/8 of the network's input: files resized as the survey resizes them): a file
  per task and image, and scored from the files the metrics are the evaluation's own (normals:
  but for their 8-bit encoding; edge: odsF's randomised matching)."""
  evaluated = train.evaluate_checkpoint(config, str(workdir), "latest", save_predictions=True)
  directory = workdir / prediction_files.WORKDIR_SUBDIR
  for task in tasks.FULL_TASKS["pascal"]:
    assert len(list((directory / task).iterdir())) == 2, task
  rescored = prediction_files.score_split(config, directory)
  for key in ("semseg/miou", "semseg/pixel_acc", "human_parts/miou", "sal/max_iou"):
    np.testing.assert_allclose(rescored[key], evaluated[key], rtol=1e-6, err_msg=key)
  assert abs(rescored["normals/mean_angle"] - evaluated["normals/mean_angle"]) < 0.5
  assert rescored["edge/odsF"] == pytest.approx(evaluated["edge/odsF"], rel=0.02)
  assert rescored["edge/num_images"] == 2 and "edge/loss" not in rescored
