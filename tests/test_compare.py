"""The comparison table: Delta_m against paper or measured STL, grouping, errors, model cost."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterfuse_jax import compare

# Paper, Tables 2 and 3.
PAPER_PASCAL_IFBC = {"semseg/miou": 65.5761, "human_parts/miou": 63.1563, "sal/max_iou": 66.944}
PAPER_NYUD = {
    "ifbC": {"semseg/miou": 39.1596, "depth/rmse": 0.6011},
    "mtl": {"semseg/miou": 35.0475, "depth/rmse": 0.6679},
    "mtinet": {"semseg/miou": 37.6181, "depth/rmse": 0.6066},
}


def write_run(root, name, config_name, results, **overrides):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.unlock()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  workdir = root / name
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  # As training leaves it: the last (metrics.json) and the best evaluation (the same here).
  for name in ("metrics.json", "metrics_best.json"):
    (workdir / name).write_text(json.dumps({**results, "delta_m": -99.0}))
  return workdir


def _row(table, title):
  rows = [line for line in table.splitlines() if line.startswith(f"| {title} |")]
  assert len(rows) == 1, (title, table)
  return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_delta_m_against_the_paper_stl(tmp_path):
  runs = [compare.load_run(write_run(tmp_path, n, f"nyud_{n}", r)) for n, r in PAPER_NYUD.items()]
  table = compare.comparison_table(runs)
  # REFERENCE.md: the formula on the paper's printed metrics gives +10.46, -0.47, +7.84.
  assert _row(table, "Ours (w/ IFB C)")[4] == "+10.46"
  assert _row(table, "MTL")[4] == "-0.47"
  assert _row(table, "MTI-Net")[4] == "+7.84"
  assert _row(table, "STL (paper)")[2:5] == ["35.0091", "0.6610", "+0.00"]
  assert "the paper's STL results" in table
  assert "| Model | Settings | SemSeg ↑ | Depth ↓ | Δm (%) ↑ |" in table


def test_delta_m_against_a_measured_stl_run(tmp_path):
  stl = {"semseg/miou": 60.0, "human_parts/miou": 50.0, "sal/max_iou": 70.0}
  runs = [compare.load_run(write_run(tmp_path, "pascal_stl", "pascal_stl", stl)),
          compare.load_run(write_run(tmp_path, "pascal_ifbC", "pascal_ifbC", PAPER_PASCAL_IFBC))]
  table = compare.comparison_table(runs)
  expected = 100 / 3 * ((65.5761 - 60) / 60 + (63.1563 - 50) / 50 + (66.944 - 70) / 70)
  row = _row(table, "Ours (w/ IFB C)")
  assert row[1] == "n_iter=4, α₀=0.3"
  assert row[5] == f"{expected:+.2f}"
  assert _row(table, "STL")[5] == "+0.00"
  assert "STL (paper)" not in table and "the measured STL run" in table


def test_paper_pascal_delta_m(tmp_path):
  run = compare.load_run(write_run(tmp_path, "ifbC", "pascal_ifbC", PAPER_PASCAL_IFBC))
  # REFERENCE.md: the formula reproduces the paper's PASCAL Delta_m, +5.085 (printed 5.08).
  assert _row(compare.comparison_table([run]), "Ours (w/ IFB C)")[5] == "+5.09"


def test_groups_sweeps_and_several_stl_runs(tmp_path):
  nyud_stl = {"semseg/miou": 35.0, "depth/rmse": 0.66}
  runs = [
      compare.load_run(write_run(tmp_path, "stl_a", "nyud_stl", nyud_stl)),
      compare.load_run(write_run(tmp_path, "stl_b", "nyud_stl",
                                 {"semseg/miou": 70.0, "depth/rmse": 0.33})),
      compare.load_run(write_run(tmp_path, "alpha05", "nyud_ifbC", PAPER_NYUD["ifbC"],
                                 **{"model.tpim.alpha_init": 0.5})),
      compare.load_run(write_run(tmp_path, "noifb", "nyud_noifb", PAPER_NYUD["ifbC"])),
      compare.load_run(write_run(tmp_path, "pascal", "pascal_padnet", PAPER_PASCAL_IFBC)),
  ]
  with pytest.raises(compare.CompareError, match="--stl"):
    compare.comparison_table(runs)
  table = compare.comparison_table(runs, stl_workdir=str(tmp_path / "stl_a"))
  assert "### nyud: semseg, depth" in table and "### pascal: semseg, human_parts, sal" in table
  expected = 50 * ((39.1596 - 35.0) / 35.0 - (0.6011 - 0.66) / 0.66)
  assert _row(table, "Ours (w/ IFB C)")[1] == "n_iter=18, α₀=0.5"
  assert _row(table, "Ours (w/ IFB C)")[4] == f"{expected:+.2f}"
  assert _row(table, "Ours (w/o IFB)")[1] == ""
  assert _row(table, "PAD-Net")[5] == "+5.09"  # PASCAL has no STL run: paper references


def test_cli_writes_the_table_and_reports_bad_workdirs(tmp_path, capsys):
  good = write_run(tmp_path, "mtl", "nyud_mtl", PAPER_NYUD["mtl"])
  out = tmp_path / "tables" / "table.md"
  assert compare.main([str(good), "--out", str(out), "--no-cost"]) == 0
  printed = capsys.readouterr().out
  assert out.read_text() == printed
  assert _row(printed, "MTL")[4] == "-0.47"

  (tmp_path / "empty").mkdir()
  assert compare.main([str(good), str(tmp_path / "empty"), "--no-cost"]) == 1
  assert "empty/config.json not found" in capsys.readouterr().err

  partial = write_run(tmp_path, "partial", "nyud_mtl", {"semseg/miou": 30.0})
  assert compare.main([str(partial), "--no-cost", "--out", str(out)]) == 1
  assert "depth/rmse" in capsys.readouterr().err


def test_the_table_uses_the_best_or_the_last_evaluation_as_asked(tmp_path, capsys):
  workdir = write_run(tmp_path, "ifbC", "nyud_ifbC", PAPER_NYUD["ifbC"])  # best: IFB C's numbers
  (workdir / "metrics.json").write_text(json.dumps({**PAPER_NYUD["mtl"], "delta_m": 0.0}))
  out = tmp_path / "table.md"
  assert compare.main([str(workdir), "--no-cost", "--out", str(out)]) == 0  # default: best
  table = capsys.readouterr().out
  assert _row(table, "Ours (w/ IFB C)")[2:5] == ["39.1596", "0.6011", "+10.46"]
  assert "Metrics of each run's best evaluation (highest Δm; metrics_best.json)" in table
  assert compare.main([str(workdir), "--no-cost", "--checkpoint", "last", "--out", str(out)]) == 0
  table = capsys.readouterr().out
  assert _row(table, "Ours (w/ IFB C)")[2:5] == ["35.0475", "0.6679", "-0.47"]
  assert "Metrics of each run's last evaluation (after the final step; metrics.json)" in table
  assert out.read_text() == table

  (workdir / "metrics_best.json").unlink()  # a run from before the best evaluation was recorded
  assert compare.main([str(workdir), "--no-cost", "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "metrics_best.json not found" in err and "use --checkpoint last" in err
  (workdir / "metrics.json").unlink()  # a run killed before its first evaluation
  for checkpoint in ("best", "last"):
    assert compare.main([str(workdir), "--no-cost", "--checkpoint", checkpoint]) == 1
    err = capsys.readouterr().err
    assert "has not evaluated yet" in err and "--checkpoint last" not in err, err


def _tiny_iterfuse(n_iter):
  config = importlib.import_module("configs.nyud_ifbC").get_config()
  config.unlock()
  config.model.task_channels = 8
  config.model.initial_blocks = 1
  config.model.tpim.n_iter = n_iter
  config.dataset.train_size = (64, 64)
  return config


def test_model_cost_counts_parameters_and_every_ifb_iteration():
  costs = {n: compare.model_cost(_tiny_iterfuse(n)) for n in (1, 2, 4)}
  params = {p for p, _ in costs.values()}
  assert len(params) == 1  # alpha is one scalar whatever n_iter
  model_config = _tiny_iterfuse(1)
  from iterfuse_jax.models import build_model  # pylint: disable=g-import-not-at-top
  variables = jax.eval_shape(
      lambda x: build_model(model_config).init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert params == {sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))}
  flops = {n: g for n, (_, g) in costs.items()}
  # Each extra IFB iteration adds the same cost (2 CIBs x (Co V on 8x8 positions x 8 channels
  # + the update)), so the loop is counted per iteration, not once.
  step = flops[2] - flops[1]
  assert step * 1e9 >= 2 * 2 * 64 * 64 * 8
  np.testing.assert_allclose(flops[4] - flops[2], 2 * step, rtol=1e-6)
  streamed = _tiny_iterfuse(2)
  streamed.model.tpim.ifb_impl = "streamed"
  assert compare.model_cost(streamed) == costs[2]


@pytest.mark.parametrize("arg, dataset, model", [
    ("stl", "nyud", "stl"), ("padnet", "nyud", "padnet"), ("pascal_mtinet", "pascal", "mtinet"),
    ("pascal_ifbA", "pascal", "iterfuse"), ("pascal_atrc", "pascal", "atrc"),
])
def test_demo_rows_config(arg, dataset, model):
  demo_rows = importlib.import_module("configs.demo_rows")
  demo = importlib.import_module("configs.demo").get_config()
  config = demo_rows.get_config(arg)
  assert (config.dataset.name, config.model.name) == (dataset, model)
  assert tuple(config.dataset.train_size) == tuple(demo.dataset.train_size)
  assert config.synthetic_data.enabled and config.model.task_channels == demo.model.task_channels
  assert config.num_epochs == demo.num_epochs
  assert config.optimizer.name == "adam"
  if arg == "pascal_ifbA":
    assert (config.model.tpim.variant, config.model.tpim.n_iter) == ("A", 4)
  if model == "stl":
    assert set(config.loss_weights.values()) == {1.0}
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked


def test_demo_rows_rejects_unknown_rows():
  with pytest.raises(ValueError, match="unknown row 'invpt'"):
    importlib.import_module("configs.demo_rows").get_config("invpt")
  with pytest.raises(ValueError, match="unknown row 'nyud_full_ifbA'"):
    importlib.import_module("configs.demo_rows").get_config("nyud_full_ifbA")


@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
@pytest.mark.parametrize("row", ["stl", "mtl", "padnet", "mtinet", "densemtl", "atrc", "ifbC"])
def test_full_task_rows(dataset, row):
  from iterfuse_jax import tasks
  config = importlib.import_module(f"configs.{dataset}_full_{row}").get_config()
  base = importlib.import_module(f"configs.{dataset}_{row}").get_config()
  assert tuple(config.dataset.tasks) == tasks.FULL_TASKS[dataset]
  assert config.model.to_dict() == base.model.to_dict()
  assert config.optimizer.to_dict() == base.optimizer.to_dict()
  expected = {t: 1.0 for t in tasks.TASKS} if row == "stl" else {
      t: tasks.get_task(t).loss_weight for t in tasks.TASKS}
  assert config.loss_weights.to_dict() == expected
  demo = importlib.import_module("configs.demo_rows").get_config(f"{dataset}_full_{row}")
  assert tuple(demo.dataset.tasks) == tasks.FULL_TASKS[dataset]
  assert demo.model.name == config.model.name and demo.synthetic_data.enabled
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked


def test_stl_best_is_each_tasks_own_best_evaluation(tmp_path):
  """The survey selects each single-task model by its own metric: semseg's best and depth's best
  come from different evaluations; --checkpoint last keeps the final one."""
  evaluations = [
      {"step": 90, "metrics": {"semseg/miou": 30.0, "semseg/pixel_acc": 60.0, "depth/rmse": 0.60,
                               "depth/abs_rel": 0.2, "delta_m": 0.0}},
      {"step": 95, "metrics": {"semseg/miou": 34.0, "semseg/pixel_acc": 64.0, "depth/rmse": 0.70,
                               "depth/abs_rel": 0.3, "delta_m": 1.0}},
      {"step": 100, "metrics": {"semseg/miou": 33.0, "semseg/pixel_acc": 63.0, "depth/rmse": 0.65,
                                "depth/abs_rel": 0.25, "delta_m": 0.5}},
  ]
  workdir = write_run(tmp_path, "stl", "nyud_stl", evaluations[-1]["metrics"])
  (workdir / "evaluations.json").write_text(json.dumps({"evaluations": evaluations}))
  best = compare.load_run(workdir, "best")
  assert best.headline() == {"semseg": 34.0, "depth": 0.60}
  assert best.results["best_step/semseg"] == 95 and best.results["best_step/depth"] == 90
  assert best.results["semseg/pixel_acc"] == 64.0 and best.results["depth/abs_rel"] == 0.2
  assert compare.load_run(workdir, "last").headline() == {"semseg": 33.0, "depth": 0.65}
  ifbc = compare.load_run(write_run(tmp_path, "ifbC", "nyud_ifbC", PAPER_NYUD["ifbC"]))
  table = compare.comparison_table([best, ifbc], costs={})
  assert "STL: each task at its own best evaluation" in table
  # Delta_m of IFB C is measured against STL's per-task bests.
  expected = 100 * ((39.1596 - 34.0) / 34.0 - (0.6011 - 0.60) / 0.60) / 2
  assert f"{expected:+.2f}" in _row(table, "Ours (w/ IFB C)")[4]


def test_stl_edge_is_chosen_among_the_evaluations_with_a_boundary_score(tmp_path):
  """Edge odsF exists only for the evaluations the offline boundary evaluation scored (the last
  and the best one): the STL edge row takes the best of those; semseg still takes its own best."""
  def evaluation(step, miou, odsf=None):
    m = {"semseg/miou": miou, "depth/rmse": 0.6, "normals/mean_angle": 20.0, "edge/loss": 0.1,
         "delta_m": 0.0}
    if odsf is not None:
      m["edge/odsF"] = odsf
    return {"step": step, "metrics": m}

  evals = [evaluation(90, 30.0), evaluation(95, 40.0, odsf=55.0), evaluation(100, 35.0, odsf=60.0)]
  workdir = write_run(tmp_path, "stl", "nyud_full_stl", evals[-1]["metrics"])
  (workdir / "evaluations.json").write_text(json.dumps({"evaluations": evals}))
  run = compare.load_run(workdir, "best")
  assert run.headline()["semseg"] == 40.0 and run.headline()["edge"] == 60.0
  assert run.results["best_step/edge"] == 100 and run.results["best_step/semseg"] == 95

  for e in evals:
    e["metrics"].pop("edge/odsF", None)
  (workdir / "evaluations.json").write_text(json.dumps({"evaluations": evals}))
  with pytest.raises(compare.CompareError, match=r"evaluations.json: no evaluation has 'edge/odsF'"):
    compare.load_run(workdir, "best")
