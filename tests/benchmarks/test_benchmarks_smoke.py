"""The benchmark scripts run end to end at a tiny size (no timing is asserted)."""

import json

import pytest

from benchmarks import boundary_eval, checkpoint_save, ifb_memory, ifb_precision, startup


def test_ifb_memory_benchmark_smoke(tmp_path, capsys):
  rows_file = tmp_path / "rows.json"
  assert ifb_memory.main(["--grids", "4x5", "--channels", "8", "--n-iter", "2", "--repeats", "1",
                          "--no-isolate", "--json", str(rows_file)]) == 0
  printed = capsys.readouterr().out
  assert "one CIB forward+backward: C=8, n_iter=2" in printed
  rows = json.loads(rows_file.read_text())
  assert [(r["part"], r["impl"], r["m"]) for r in rows] == [
      ("cib", "materialized", 20), ("cib", "materialized-autodiff", 20), ("cib", "streamed", 20)]
  for row in rows:
    assert row["temp_bytes"] > 0 and row["step_s"] > 0 and row["compile_s"] > 0
    # Arguments hold the block's parameters and two [1, 8, 10, 8] float32 feature maps.
    assert row["argument_bytes"] >= 2 * 8 * 10 * 8 * 4
    assert row["xla_total_bytes"] >= row["temp_bytes"] + row["argument_bytes"]
    assert f"{row['m']:>6d}" in printed


def test_ifb_memory_benchmark_isolated_setting_smoke(capsys):
  """The default mode: each setting in a fresh subprocess, figures passed back as JSON."""
  assert ifb_memory.main(["--part", "ifb", "--impls", "streamed", "--grids", "3x3",
                          "--channels", "4", "--n-iter", "1", "--repeats", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "one IFB forward+backward: C=4, n_iter=1, IFB C, batch 1, sc=2"
  row = lines[2].split()
  assert row[:4] == ["ifb", "streamed", "3x3", "9"]
  assert "measured =" in lines[-1]


def test_boundary_eval_benchmark_smoke(capsys):
  assert boundary_eval.main(["--images", "1", "--workers", "1", "--scale", "0.125"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].endswith("99 thresholds")
  rows = [line.split("|")[1:-1] for line in lines[3:]]
  assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
      ("nyud", "60x80", "0.011"), ("pascal", "47x62", "0.0075")]
  assert all(float(r[4]) > 0 and 0 <= float(r[5]) <= 100 for r in rows)


def test_ifb_precision_benchmark_smoke(capsys):
  assert ifb_precision.main(["--grid", "8x8", "--channels", "8", "--n-iter", "4",
                             "--repeats", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("IFB C forward+backward from Q, K, V: M = 8x8 = 64, C 8, d 4")
  rows = {line[:24].strip(): line[24:].split() for line in lines[2:]}
  assert list(rows) == ["float32", "bf16, float32 products", "bf16, bf16 products"]
  errors = {name: [float(x) for x in values[1:]] for name, values in rows.items()}
  # float32 is float32 rounding away from float64; bfloat16 activations, bfloat16 rounding.
  assert max(errors["float32"]) < 1e-4
  assert all(1e-4 < e[0] < 3e-2 for name, e in errors.items() if name != "float32"), errors
  assert "stacked backward" in lines[0]
  assert ifb_precision.main(["--grid", "8x8", "--channels", "8", "--n-iter", "4", "--repeats",
                             "1", "--ifb-gradient", "autodiff"]) == 0
  autodiff = capsys.readouterr().out.splitlines()
  assert "autodiff backward" in autodiff[0] and len(autodiff) == len(lines)


def test_ifb_precision_benchmark_rejects_a_bad_grid(capsys):
  with pytest.raises(SystemExit):
    ifb_precision.main(["--grid", "8by8"])
  assert "--grid must be HxW" in capsys.readouterr().err


def test_checkpoint_save_benchmark_smoke(capsys):
  assert checkpoint_save.main(["--config", "configs/demo.py", "--set", "model.task_channels=8",
                               "--set", "model.tpim.n_iter=2", "--set", "model.backbone=w18_tiny",
                               "--saves", "2"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[0].startswith("configs/demo.py: ") and "MiB" in lines[0], out
  held, total = (float(x) for x in lines[3].split()[1:3])
  assert 0 < held <= total, out
  assert lines[-1].startswith("median: the loop is held ") and "committed steps [1, 2]" in out


def test_checkpoint_save_benchmark_rejects_a_bad_override():
  with pytest.raises(ValueError, match="expected KEY=VALUE"):
    checkpoint_save.main(["--config", "configs/demo.py", "--set", "model.task_channels"])


@pytest.mark.slow
def test_startup_benchmark_smoke(capsys):
  assert startup.main(["--config", "configs/demo.py", "--set", "model.task_channels=8",
                       "--set", "model.tpim.n_iter=2", "--set", "model.backbone=w18_tiny",
                       "--set", "batch_size=2", "--repeats", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "configs/demo.py: a fresh process per run, no compilation cache", lines
  rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[2:4]}
  assert set(rows) == {"sequential", "overlapped"}, lines
  for mode, (init_s, step_s, ready_s, first_step_s) in rows.items():
    assert 0 < init_s <= ready_s and 0 < step_s <= ready_s and first_step_s > 0, (mode, lines)
  # One after the other, the two add up; at once, the later one ends it.
  init_s, step_s, ready_s, _ = rows["sequential"]
  assert ready_s >= init_s + step_s - 0.2, lines
  init_s, step_s, ready_s, _ = rows["overlapped"]
  assert ready_s < init_s + step_s and ready_s >= max(init_s, step_s) - 0.2, lines
  assert lines[-1].startswith("median until the first step can run: sequential "), lines
