"""The record of a run's evaluations and the metrics files it reports, kept in the workdir.

  evaluations.json   every evaluation of the run: {"evaluations": [{"step": 8, "metrics": {...}},
                     ...]} in step order
  metrics.json       the last evaluation (after the final step): {"semseg/miou": ..., ...}
  metrics_best.json  the best evaluation: the highest Delta_m ("delta_m"), the earliest of ties,
                     which is what the survey code reports
  metrics.md         both as a Markdown table

Process 0 writes them, each file whole or not at all (a temporary file renamed over it), so a run
killed at any moment leaves the previous content or the new one, never a part.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from etils import epath

EVALUATIONS_FILE = "evaluations.json"
LAST_FILE = "metrics.json"
BEST_FILE = "metrics_best.json"
TABLE_FILE = "metrics.md"
# The metrics file of each choice of `python -m iterfuse_jax.compare --checkpoint`.
METRICS_FILES = {"best": BEST_FILE, "last": LAST_FILE}
SELECTION_METRIC = "delta_m"


def write_atomic(path: str | epath.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file renamed over it."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  os.replace(tmp, path)


class Evaluations:
  """The evaluations of a run so far, read from and written to `<workdir>/evaluations.json`."""

  def __init__(self, workdir: str | epath.Path):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / EVALUATIONS_FILE
    self._results: dict[int, dict[str, float]] = {}
    if self.path.exists():
      try:
        entries = json.loads(self.path.read_text())["evaluations"]
        self._results = {int(e["step"]): {k: float(v) for k, v in e["metrics"].items()}
                         for e in entries}
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{self.path} is not a record of evaluations ({e!r}); move it away to "
                         "evaluate again") from None

  def __contains__(self, step: int) -> bool:
    return step in self._results

  def __getitem__(self, step: int) -> dict[str, float]:
    return dict(self._results[step])

  def __len__(self) -> int:
    return len(self._results)

  @property
  def steps(self) -> list[int]:
    return sorted(self._results)

  def best_step(self) -> int | None:
    """The step of the highest Delta_m (the earliest of ties); None before any evaluation."""
    if not self._results:
      return None
    return max(self.steps, key=lambda s: (self._results[s][SELECTION_METRIC], -s))

  def is_best(self, step: int) -> bool:
    """Whether the evaluation of `step` beats every earlier one (strictly)."""
    value = self._results[step][SELECTION_METRIC]
    return all(self._results[s][SELECTION_METRIC] < value for s in self.steps if s < step)

  def add(self, step: int, results: Mapping[str, float]) -> None:
    """Records the evaluation of `step` (in memory; `write` saves the record)."""
    if SELECTION_METRIC not in results:
      raise ValueError(f"evaluation results need {SELECTION_METRIC!r}, got {sorted(results)}")
    self._results[step] = {k: float(v) for k, v in results.items()}

  def write(self) -> None:
    """Writes evaluations.json."""
    entries = [{"step": s, "metrics": self._results[s]} for s in self.steps]
    write_atomic(self.path, json.dumps({"evaluations": entries}, indent=1, sort_keys=True))

  def write_reports(self, last_step: int, title: str) -> str:
    """Writes metrics.json (the evaluation of `last_step`), metrics_best.json and metrics.md;
    returns the Markdown table."""
    best = self.best_step()
    write_atomic(self.workdir / LAST_FILE,
                 json.dumps(self._results[last_step], indent=2, sort_keys=True))
    write_atomic(self.workdir / BEST_FILE,
                 json.dumps(self._results[best], indent=2, sort_keys=True))
    table = self.table(last_step, title)
    write_atomic(self.workdir / TABLE_FILE, table + "\n")
    return table

  def table(self, last_step: int, title: str) -> str:
    """A Markdown table of every metric at the last step and at the best step."""
    best = self.best_step()
    last, best_results = self._results[last_step], self._results[best]
    lines = [f"### {title}", "",
             f"| metric | last (step {last_step}) | best (step {best}) |", "|---|---|---|"]
    lines += [f"| {name} | {last[name]:.4f} | {best_results.get(name, float('nan')):.4f} |"
              for name in sorted(last)]
    lines += ["", f"{len(self)} evaluations (steps {', '.join(map(str, self.steps))}); best = "
              "highest Delta_m."]
    return "\n".join(lines)
