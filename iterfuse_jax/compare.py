"""Collects finished runs into the paper's comparison table (Tables 2-4), with Delta_m, size and cost.

  python -m iterfuse_jax.compare /runs/nyud_stl /runs/nyud_mtl /runs/nyud_ifbC --out table.md

Each workdir must hold what `iterfuse_jax.train.train_and_evaluate` writes there: `config.json`
(the run's config) and the metrics of its best and last evaluations (`metrics_best.json`,
`metrics.json`: flat {"semseg/miou": 35.0, ...}; see `iterfuse_jax.evaluations`). Like the survey
code, the table reports each run's best evaluation (highest Delta_m among those of the last
epochs) unless `--checkpoint last` asks for the evaluation after the final step; the table says
which. The STL row's best is per task (each task at the evaluation where its own metric is best,
from `evaluations.json`), as the survey's separately trained single-task models are selected.
Runs are grouped by dataset and task set, one Markdown table per group, in the paper's form: model,
the headline metric of every task (mIoU %, depth RMSE m, saliency maxIoU %, normals mean angular
error in degrees, edge odsF %), Delta_m (%) and the model's parameter count and GFLOPs.

Delta_m is recomputed here from the headline metrics (`iterfuse_jax.metrics.delta_m`), against
the measured single-task run when an STL workdir (model.name "stl") of the same dataset and tasks
is among the inputs (or the one given with --stl), else against the paper's STL numbers (Table 2).

Parameters are those of `build_model(config)` (trainable ones, BatchNorm statistics excluded).
GFLOPs are XLA's cost analysis of one eval-mode forward pass of a single image at the config's
`dataset.train_size`, counting a multiply-add as 2 FLOPs. XLA counts the body of a loop once, so
the IFB's `fori_loop` is unrolled while the cost is measured, and the cost is that of the
materialized IFB (`ifb_impl="streamed"` computes the same function, recomputing the affinities
block by block to save memory). Lowering for the analysis does not compile or run the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from typing import Any, Mapping, Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iterfuse_jax import evaluations, metrics
from iterfuse_jax.inference import CONFIG_FILE
from iterfuse_jax import tasks as task_registry

CHECKPOINT_TEXT = {
    "best": "each run's best evaluation (highest Δm; {file}), as the survey code reports",
    "last": "each run's last evaluation (after the final step; {file})",
}

# Column titles as the paper prints them.
TASK_TITLES = {"semseg": "SemSeg", "depth": "Depth", "human_parts": "PartSeg", "sal": "Sal",
               "normals": "Normals", "edge": "Edge"}
MODEL_TITLES = {"stl": "STL", "mtl": "MTL", "padnet": "PAD-Net", "mtinet": "MTI-Net",
                "densemtl": "DenseMTL", "atrc": "ATRC"}
# Rows appear in the paper's order (Table 2, then Table 3's IFB ablation); ties keep input order.
ROW_ORDER = ("stl", "mtl", "padnet", "mtinet", "densemtl", "atrc", "iterfuse")
IFB_ORDER = ("none", "A", "B", "C")


class CompareError(ValueError):
  """A workdir or argument that cannot be compared; the message says which and why."""


def paper_stl_references(dataset: str) -> dict[str, float]:
  """The paper's single-task results (Table 2), the Delta_m reference when no STL run is given."""
  from configs.default import PAPER_STL_REFERENCES  # pylint: disable=g-import-not-at-top
  if dataset not in PAPER_STL_REFERENCES:
    raise CompareError(f"the paper has no STL results for dataset {dataset!r}")
  return dict(PAPER_STL_REFERENCES[dataset])


# ----------------------------------------------------------------------------- reading runs


class Run:
  """One finished experiment: its workdir, config and final metrics."""

  def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict,
               results: Mapping[str, float], metrics_file: str = evaluations.BEST_FILE):
    self.workdir = workdir
    self.config = config
    self.results = dict(results)
    self.metrics_file = metrics_file

  @property
  def dataset(self) -> str:
    return self.config.dataset.name

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.config.dataset.tasks)

  @property
  def model_name(self) -> str:
    return self.config.model.name

  def title(self) -> str:
    """The paper's row name: "STL", "PAD-Net", "Ours (w/ IFB C)", ..."""
    name = self.model_name
    if name == "iterfuse":
      tpim = self.config.model.tpim
      return f"Ours (w/ IFB {tpim.variant})" if tpim.use_ifb else "Ours (w/o IFB)"
    return MODEL_TITLES.get(name, name)

  def settings(self) -> str:
    """What distinguishes runs of one model: IFB iterations and alpha_0; ATRC's contexts."""
    if self.model_name == "atrc":
      return self._atrc_settings()
    if self.model_name != "iterfuse":
      return ""
    tpim = self.config.model.tpim
    if not tpim.use_ifb:
      return ""
    text = f"n_iter={tpim.n_iter}"
    if tpim.variant != "A":
      text += f", α₀={tpim.alpha_init:g}"
    return text

  def _atrc_settings(self) -> str:
    # One context for all pairs (ATRC's single-context baselines), or each target's row.
    from iterfuse_jax.models import build  # pylint: disable=g-import-not-at-top
    options = self.config.model.get("atrc") or {}
    tasks = tuple(self.config.dataset.tasks)
    genotype = build.load_atrc_genotype(options.get("genotype", "global"), tasks)
    kinds = {genotype[t][s] for t in tasks for s in tasks}
    if len(kinds) == 1:
      return f"contexts: all {kinds.pop()}"
    return "; ".join(f"{TASK_TITLES.get(t, t)} ← " + ", ".join(
        f"{TASK_TITLES.get(s, s)} {genotype[t][s]}" for s in tasks) for t in tasks)

  def sort_key(self) -> tuple[int, int]:
    name = self.model_name
    model = ROW_ORDER.index(name) if name in ROW_ORDER else len(ROW_ORDER)
    ifb = 0
    if name == "iterfuse":
      tpim = self.config.model.tpim
      variant = tpim.variant if tpim.use_ifb else "none"
      ifb = IFB_ORDER.index(variant) if variant in IFB_ORDER else len(IFB_ORDER)
    return model, ifb

  def headline(self) -> dict[str, float]:
    try:
      return metrics.headline_metrics(self.results, self.tasks)
    except ValueError as e:
      raise CompareError(f"{self.workdir / self.metrics_file}: {e}") from None


def _read_json(path: pathlib.Path, what: str, hint: str = "") -> Any:
  if not path.is_file():
    raise CompareError(f"{path} not found: every workdir needs the {what} that training writes "
                       f"there (run `python launch.py --config ... --workdir {path.parent}` "
                       f"to the end first){hint}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CompareError(f"{path} is not valid JSON: {e}") from None


def stl_best_per_task(workdir: pathlib.Path, config_dict: Mapping) -> dict[str, float]:
  """The STL run's metrics with each task at its own best evaluation.

  The survey code trains every single-task model separately and keeps each one's best epoch by
  its own metric; the STL networks of one run are independent, so taking each task's metrics from
  the evaluation where that task's headline metric is best gives the same choice. Ties go to the
  earliest evaluation. Reads `evaluations.json`. A task is chosen among the evaluations that
  scored it: edge odsF is computed offline for the last and the best-Delta_m evaluation only.
  """
  try:
    record = evaluations.Evaluations(workdir)
  except ValueError as e:
    raise CompareError(str(e)) from None
  tasks = tuple(config_dict["dataset"]["tasks"])
  out = {}
  for task in tasks:
    key = metrics.headline_key(task)
    sign = 1.0 if task_registry.get_task(task).higher_is_better else -1.0
    scored = [step for step in record.steps if key in record[step]]
    if not scored:
      raise CompareError(f"{workdir / evaluations.EVALUATIONS_FILE}: no evaluation has {key!r} "
                         f"(the {task} metric); run `python launch.py --config ... --workdir "
                         f"{workdir}` to the end first")
    best = max(scored, key=lambda step, key=key, sign=sign: (sign * record[step][key], -step))
    out.update({k: v for k, v in record[best].items() if k.startswith(f"{task}/")})
    out[f"best_step/{task}"] = float(best)
  return out


def load_run(workdir: str | pathlib.Path, checkpoint: str = "best") -> Run:
  """Reads `config.json` and the metrics of the best (`metrics_best.json`) or the last
  (`metrics.json`) evaluation of a workdir; raises CompareError naming the file."""
  if checkpoint not in evaluations.METRICS_FILES:
    raise CompareError(f"checkpoint must be one of {sorted(evaluations.METRICS_FILES)}, got "
                       f"{checkpoint!r}")
  metrics_file = evaluations.METRICS_FILES[checkpoint]
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise CompareError(f"workdir {workdir} does not exist")
  config_dict = _read_json(workdir / CONFIG_FILE, "config")
  if not (workdir / evaluations.METRICS_FILES["last"]).exists():
    hint = ("; the run has not evaluated yet (still training, or stopped before its first "
            "evaluation): its launch.py command finishes it")
  elif checkpoint == "best":
    hint = ("; a run trained before best and last were both recorded has only metrics.json: "
            "use --checkpoint last")
  else:
    hint = ""
  results = _read_json(workdir / metrics_file, f"metrics of the {checkpoint} evaluation", hint)
  if (checkpoint == "best" and config_dict.get("model", {}).get("name") == "stl"
      and (workdir / evaluations.EVALUATIONS_FILE).exists()):
    results, metrics_file = stl_best_per_task(workdir, config_dict), evaluations.EVALUATIONS_FILE
  if not isinstance(results, dict):
    raise CompareError(f"{workdir / metrics_file} must hold a JSON object of metric -> number")
  for key in ("dataset", "model"):
    if key not in config_dict:
      raise CompareError(f"{workdir / CONFIG_FILE} has no {key!r} block")
  config = ml_collections.ConfigDict(config_dict)
  try:
    task_registry.validate_tasks(config.dataset.tasks, config.dataset.name)
  except ValueError as e:
    raise CompareError(f"{workdir / CONFIG_FILE}: {e}") from None
  bad = {k: v for k, v in results.items()
         if not isinstance(v, (int, float)) or isinstance(v, bool)}
  if bad:
    raise CompareError(f"{workdir / metrics_file}: non-numeric values {bad}")
  return Run(workdir, config, results, metrics_file)


# ----------------------------------------------------------------------------- size and cost


def _unrolled_fori_loop(original):
  """fori_loop that unrolls static trip counts in Python, so that XLA's cost counts every step."""

  def fori_loop(lower, upper, body_fun, init_val, **kwargs):
    if isinstance(lower, (int, np.integer)) and isinstance(upper, (int, np.integer)):
      value = init_val
      for i in range(int(lower), int(upper)):
        value = body_fun(i, value)
      return value
    return original(lower, upper, body_fun, init_val, **kwargs)

  return fori_loop


@contextlib.contextmanager
def _loops_unrolled():
  # Only while tracing for the cost analysis; nothing is run under the patch.
  with mock.patch.object(jax.lax, "fori_loop", _unrolled_fori_loop(jax.lax.fori_loop)):
    yield


def model_cost(config: ml_collections.ConfigDict, flops: bool = True) -> tuple[int, float | None]:
  """(trainable parameter count, GFLOPs of a 1-image eval forward at dataset.train_size).

  GFLOPs is None when `flops` is False or XLA reports no FLOP count.
  """
  from iterfuse_jax.models import build_model  # pylint: disable=g-import-not-at-top

  if "tpim" in config.model and config.model.tpim.get("ifb_impl") == "streamed":
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.tpim.ifb_impl = "materialized"  # same function; its loops are all unrollable
  model = build_model(config)
  h, w = (int(s) for s in config.dataset.train_size)
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(variables["params"])))
  if not flops:
    return params, None
  with _loops_unrolled():
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return params, None
  return params, float(cost["flops"]) / 1e9


def _cost_key(config: ml_collections.ConfigDict) -> str:
  # Runs that differ only in training settings (alpha_init, lr, ...) share a model cost.
  model = config.model.to_dict()
  model.pop("pretrained", None)
  if "tpim" in model:
    model["tpim"] = {k: v for k, v in model["tpim"].items()
                     if k not in ("alpha_init", "ifb_impl")}
  return json.dumps([model, config.dataset.name, list(config.dataset.tasks),
                     list(config.dataset.train_size)], sort_keys=True, default=str)


# ----------------------------------------------------------------------------- table


def _format_metric(value: float | None) -> str:
  return "—" if value is None else f"{value:.4f}"


def _format_delta(value: float) -> str:
  return f"{value:+.2f}"


def _group_key(run: Run) -> tuple[str, tuple[str, ...]]:
  return run.dataset, run.tasks


def choose_stl(runs: Sequence[Run], dataset: str, tasks: tuple[str, ...],
               stl_workdir: str | None) -> Run | None:
  """The measured STL run that is the Delta_m reference of a (dataset, tasks) group, if any."""
  candidates = [r for r in runs if r.model_name == "stl" and _group_key(r) == (dataset, tasks)]
  if stl_workdir is not None:
    wanted = pathlib.Path(stl_workdir).resolve()
    chosen = [r for r in candidates if r.workdir.resolve() == wanted]
    if chosen:
      return chosen[0]
  if len(candidates) > 1:
    raise CompareError(
        f"{len(candidates)} STL runs on {dataset} ({', '.join(tasks)}): "
        f"{[str(r.workdir) for r in candidates]}; choose the reference with --stl WORKDIR")
  return candidates[0] if candidates else None


def comparison_table(runs: Sequence[Run], stl_workdir: str | None = None,
                     costs: Mapping[str, tuple[int, float | None]] | None = None,
                     checkpoint: str = "best") -> str:
  """Markdown tables (one per dataset and task set) of the runs in the paper's form.

  Args:
    runs: the finished runs (`load_run(..., checkpoint)`); rows follow the paper's order of
      models, then the input order.
    stl_workdir: which STL run is the Delta_m reference when several are given.
    costs: cost key (`_cost_key`) -> (parameters, GFLOPs); rows without an entry print "—".
    checkpoint: which evaluation the runs' metrics are ("best" or "last"), said under each table.

  Returns:
    The Markdown text.
  """
  if not runs:
    raise CompareError("no runs to compare")
  costs = costs or {}
  groups: dict[tuple[str, tuple[str, ...]], list[Run]] = {}
  for run in runs:
    groups.setdefault(_group_key(run), []).append(run)

  sections = []
  for (dataset, tasks), group in groups.items():
    stl = choose_stl(runs, dataset, tasks, stl_workdir)
    if stl is not None:
      references = stl.headline()
      source = f"the measured STL run `{stl.workdir}`"
    else:
      references = paper_stl_references(dataset)
      missing = [t for t in tasks if t not in references]
      if missing:
        raise CompareError(
            f"no STL run among the inputs and the paper has no STL result for {missing} on "
            f"{dataset}: add a single-task run of the same tasks (e.g. "
            f"configs/{dataset}_full_stl.py for the full task sets) to the workdirs")
      source = "the paper's STL results (Table 2)"

    arrows = {t: "↑" if task_registry.get_task(t).higher_is_better else "↓" for t in tasks}
    header = (["Model", "Settings"] + [f"{TASK_TITLES.get(t, t)} {arrows[t]}" for t in tasks]
              + ["Δm (%) ↑", "Params (M)", "GFLOPs", "Run"])
    lines = [f"### {dataset}: {', '.join(tasks)}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if stl is None:
      lines.append("| " + " | ".join(
          ["STL (paper)", ""] + [_format_metric(references[t]) for t in tasks]
          + [_format_delta(0.0), "—", "—", "—"]) + " |")
    for run in sorted(group, key=Run.sort_key):
      headline = run.headline()
      delta = metrics.delta_m(headline, references, tasks)
      params, gflops = costs.get(_cost_key(run.config), (None, None))
      lines.append("| " + " | ".join(
          [run.title(), run.settings()] + [_format_metric(headline[t]) for t in tasks]
          + [_format_delta(delta),
             "—" if params is None else f"{params / 1e6:.2f}",
             "—" if gflops is None else f"{gflops:.1f}",
             f"`{run.workdir.name}`"]) + " |")
    which = CHECKPOINT_TEXT[checkpoint].format(file=evaluations.METRICS_FILES[checkpoint])
    if any(run.metrics_file == evaluations.EVALUATIONS_FILE for run in group):
      which += " (STL: each task at its own best evaluation, from evaluations.json)"
    lines += ["", f"Metrics of {which}. Δm against {source}. Metrics: mIoU (%) for "
              "SemSeg/PartSeg, RMSE (m) for Depth, maxIoU (%) for Sal, mean angular error (°) for "
              "Normals, odsF (%) for Edge. GFLOPs: one image at the training size, multiply-add = "
              "2 FLOPs."]
    sections.append("\n".join(lines))
  return "\n\n".join(sections) + "\n"


def compute_costs(runs: Sequence[Run], flops: bool = True
                  ) -> dict[str, tuple[int, float | None]]:
  """Parameters and GFLOPs per distinct model among `runs` (each model is built once)."""
  costs = {}
  for run in runs:
    key = _cost_key(run.config)
    if key not in costs:
      try:
        costs[key] = model_cost(run.config, flops=flops)
      except ValueError as e:
        raise CompareError(f"cannot build the model of {run.workdir / CONFIG_FILE}: {e}") from None
  return costs


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m iterfuse_jax.compare",
      description="Markdown comparison table (metrics, Delta_m, params, GFLOPs) of finished "
                  "runs; each WORKDIR holds the config.json and metrics files training wrote.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--out", default="comparison.md",
                      help="file the table is written to (default: %(default)s)")
  parser.add_argument("--stl", default=None, metavar="WORKDIR",
                      help="the STL run to measure Delta_m against, when several are given")
  parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                      help="each run's best evaluation (highest Delta_m, as the survey code "
                           "reports; metrics_best.json) or its last (metrics.json) "
                           "(default: %(default)s)")
  parser.add_argument("--no-flops", action="store_true",
                      help="skip the GFLOPs (parameters are still counted)")
  parser.add_argument("--no-cost", action="store_true",
                      help="skip parameters and GFLOPs (no model is built)")
  args = parser.parse_args(argv)
  try:
    runs = [load_run(w, args.checkpoint) for w in args.workdirs]
    costs = {} if args.no_cost else compute_costs(runs, flops=not args.no_flops)
    table = comparison_table(runs, args.stl, costs, args.checkpoint)
  except CompareError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(table, end="")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(table)
  print(f"(written to {out})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
