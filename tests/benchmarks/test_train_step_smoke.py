"""benchmarks/train_step.py end to end at a tiny size: table structure and figures, no timing.

Every JAX row compiles the whole HRNet train step (tens of seconds on a CPU), so the JAX rows
compile without XLA's expensive passes and the isolated (default) mode runs one PyTorch row.
"""

import json
import math
import os

import jax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from benchmarks import train_step  # noqa: E402

# Load torch, timm, torchvision and triton now, at collection, before any test compiles with XLA:
# importing triton after an XLA compilation crashes the process.
train_step.torch_port()

# CPU PyTorch (like the JAX rows, which tests/conftest.py keeps on the CPU) unless the suite runs
# on the GPU (ITERFUSE_TEST_PLATFORM=gpu).
ON_GPU = os.environ.get("ITERFUSE_TEST_PLATFORM", "cpu") == "gpu"
TINY = ["--height", "32", "--width", "32", "--batch", "2", "--task-channels", "8", "--steps", "1",
        "--warmup", "0", "--torch-device", "cuda" if ON_GPU else "cpu", "--backbone", "w18_tiny"]
TITLE = ("train step: IterFuse (HRNet-W18-tiny (unpublished), IFB C) on nyud, 32x32, batch 2, "
         "task channels 8, float32; median of 1 steps after 0 warm-up")
POSITIVE = ("step_s", "images_per_s", "first_step_s", "peak_bytes", "max_rss_bytes", "loss",
            "num_params")


@pytest.fixture(autouse=True)
def cheap_rows(monkeypatch):
  """Here and in the rows' subprocesses: no expensive XLA passes, one PyTorch thread.

  One thread because PyTorch's spinning OpenMP threads slow a step 100-fold on a busy machine.
  """
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.setenv("OMP_NUM_THREADS", "1")
  old = (jax.config.values["jax_disable_most_optimizations"], torch.get_num_threads())
  jax.config.update("jax_disable_most_optimizations", True)
  torch.set_num_threads(1)
  yield
  jax.config.update("jax_disable_most_optimizations", old[0])
  torch.set_num_threads(old[1])


def table_rows(printed: str, n_iter: int) -> list[list[str]]:
  """The rows under "n_iter = N" and the header, split on whitespace."""
  lines = printed.splitlines()
  start = lines.index(f"n_iter = {n_iter}")
  assert lines[start + 1] == train_step.HEADER
  rows = []
  for line in lines[start + 2:]:
    if not line.strip():
      break
    rows.append(line.split())
  return rows


def check_figures(row: dict) -> None:
  for key in POSITIVE:
    assert math.isfinite(row[key]) and row[key] > 0, (key, row)
  assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"])
  if row["framework"] == "jax":
    assert row["compile_s"] > 0
    assert math.isfinite(row["xla_plan_bytes"]) and row["xla_plan_bytes"] > 0
    assert row["peak_kind"] == ("gpu peak_bytes_in_use" if ON_GPU
                                else "XLA plan temp+arg+out-alias")
  else:
    assert row["compile_s"] == 0 and row["xla_plan_bytes"] is None
    assert row["peak_kind"] == ("cuda max_memory_allocated" if ON_GPU else "process max RSS")
    assert row["device"].startswith("cuda: " if ON_GPU else "cpu: ")


def test_train_step_benchmark_in_process(tmp_path, capsys):
  """Both JAX IFBs and their PyTorch counterparts in this process; ratios pair the right rows."""
  rows_file = tmp_path / "rows.json"
  assert train_step.main([*TINY, "--n-iter", "2", "--no-isolate", "--json", str(rows_file)]) == 0
  captured = capsys.readouterr()
  printed = captured.out
  # Each JAX row reports its stages on stderr as it reaches them (a killed row names its last).
  stages = [line.split(";")[0] for line in captured.err.splitlines()
            if line.startswith(train_step.PROGRESS)]
  one_row = ["progress: initialising the parameters (compiling the initialisation)",
             "progress: initialised in", "progress: lowered in",
             "progress: compiled the train step", "progress: first step in"]
  assert len(stages) == 2 * len(one_row), stages
  for stage, start in zip(stages, one_row * 2):
    assert stage.startswith(start), (stage, start)
  assert printed.splitlines()[0] == TITLE
  rows = json.loads(rows_file.read_text())
  assert [(r["framework"], r["impl"], r["n_iter"]) for r in rows] == [
      ("jax", "materialized", 2), ("jax", "streamed", 2),
      ("torch", "materialized", 2), ("torch", "sdpa", 2)]
  for row in rows:
    check_figures(row)
  # The port is the same network: parameter for parameter, on the backbone asked for.
  assert len({r["num_params"] for r in rows}) == 1
  assert {r["backbone"] for r in rows} == {"w18_tiny"}

  torch_rows = {r["impl"]: r for r in rows if r["framework"] == "torch"}
  for row, pair in ((rows[0], "materialized"), (rows[1], "sdpa")):
    assert row["jax_over_torch"] == pytest.approx(
        row["images_per_s"] / torch_rows[pair]["images_per_s"])
  assert all("jax_over_torch" not in r for r in torch_rows.values())

  table = table_rows(printed, 2)
  assert [cells[:2] for cells in table] == [
      ["JAX", "materialized"], ["JAX", "streamed"], ["PyTorch", "materialized"],
      ["PyTorch", "sdpa"]]
  for cells, row in zip(table, rows):
    assert len(cells) == 10, cells
    assert float(cells[5]) == pytest.approx(row["images_per_s"], abs=0.006)
    if row["framework"] == "jax":
      assert float(cells[8]) == pytest.approx(row["jax_over_torch"], abs=0.006)
    else:
      assert cells[8] == "-"
  assert f"JAX: {rows[0]['device']}; {rows[0]['num_params']:,} parameters" in printed
  assert ("PyTorch: cuda: " if ON_GPU else "PyTorch: cpu: ") in printed
  assert "cumulative over this process (rows not isolated)" in printed


def test_train_step_benchmark_isolated_row(tmp_path, capsys):
  """The default mode: the row in a fresh subprocess, its figures passed back as JSON."""
  rows_file = tmp_path / "rows.json"
  assert train_step.main([*TINY, "--n-iter", "0", "--ifb-impl", "streamed", "--no-jax",
                          "--json", str(rows_file)]) == 0
  printed = capsys.readouterr().out
  (row,) = json.loads(rows_file.read_text())
  assert (row["framework"], row["impl"], row["n_iter"]) == ("torch", "sdpa", 0)
  check_figures(row)
  (cells,) = table_rows(printed, 0)
  assert cells[:2] == ["PyTorch", "sdpa"] and cells[8] == "-"
  assert "one process per row" in printed


@pytest.mark.parametrize("args, message", [
    (["--n-iter", "-1"], "non-negative"),
    (["--ifb-impl", "dense"], "unknown values"),
    (["--no-jax", "--no-torch"], "nothing to time"),
])
def test_train_step_benchmark_rejects_bad_arguments(args, message, capsys):
  with pytest.raises(SystemExit):
    train_step.main(args)
  assert message in capsys.readouterr().err


def test_the_port_refuses_what_it_does_not_implement():
  port = train_step.torch_port()
  config = train_step.benchmark_config(train_step.Setting(
      framework="jax", impl="materialized", dataset="nyud", height=32, width=32, batch=2,
      n_iter=2, variant="C", task_channels=8, dtype="bfloat16", steps=1, warmup=0))
  port.check_config_covered(config)  # Co V in the model's dtype: the port's co.to(v.dtype)
  config.model.tpim.ifb_products = "float32"
  with pytest.raises(ValueError, match=r"does not implement \{'model.tpim.ifb_products': "
                                       r"'float32'\}"):
    port.check_config_covered(config)


def test_the_backbone_choices_are_the_models_variants():
  from iterfuse_jax.models.hrnet import HRNET_VARIANTS  # pylint: disable=g-import-not-at-top

  assert set(train_step.BACKBONE_NAMES) == set(HRNET_VARIANTS)
  config = train_step.benchmark_config(train_step.Setting(
      framework="torch", impl="materialized", dataset="pascal", height=32, width=32, batch=2,
      n_iter=1, variant="C", task_channels=8, dtype="float32", steps=1, warmup=0,
      backbone="w18_tiny"))
  assert config.model.backbone == "w18_tiny"
  train_step.torch_port().check_config_covered(config)
  config.model.backbone = "w32"
  with pytest.raises(ValueError, match=r"does not implement \{'model.backbone': 'w32'\}"):
    train_step.torch_port().check_config_covered(config)


def test_a_killed_row_names_the_last_stage_it_reached(tmp_path, monkeypatch):
  """A row killed at its cap reports how far it got, from the progress lines of its stderr."""
  child = tmp_path / "slow_row.sh"
  child.write_text("#!/bin/sh\necho 'progress: initialised in 69.2 s; tracing' >&2\n"
                   "echo 'progress: lowered in 6.0 s; compiling the train step' >&2\n"
                   "exec sleep 60\n")
  child.chmod(0o755)
  monkeypatch.setattr(train_step.sys, "executable", str(child))
  setting = train_step.Setting(framework="jax", impl="materialized", dataset="nyud", height=32,
                               width=32, batch=2, n_iter=2, variant="C", task_channels=8,
                               dtype="float32", steps=1, warmup=0)
  log = tmp_path / "rows.log"
  row = train_step._measure_in_subprocess(setting, timeout_s=2, log_path=str(log))
  assert row["timed_out"] and row["wall_s"] < 30
  assert row["error"] == ("timed out after 2 s (killed); last progress: lowered in 6.0 s; "
                          "compiling the train step")
  assert "progress: initialised in 69.2 s" in log.read_text()
  assert train_step.last_progress("no stage\n") == ""
