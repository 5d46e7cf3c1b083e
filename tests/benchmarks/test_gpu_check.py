"""benchmarks/gpu_check (the GPU visit) dry-run on the CPU, its arithmetic, and its helpers.

The GPU visit happens in a later session with a few device minutes: everything it runs is run
here first at tiny shapes, through the same shell script, so that it cannot rot.
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_check, gpu_image, profile_summary
from benchmarks.train_step import Setting

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_plan_puts_the_nyud_comparison_first_at_the_paper_shapes():
  rows = gpu_check.plan(tiny=False, profile_dir="/tmp/p")
  first = rows[0]
  assert (first.group, first.label, first.setting.framework) == ("nyud", "JAX bf16", "jax")
  assert first.setting.profile_dir == "/tmp/p"
  assert [r.setting.profile_dir for r in rows[1:]] == [""] * (len(rows) - 1)
  nyud = [r.setting for r in rows if r.group == "nyud"]
  assert {(s.height, s.width, s.batch, s.n_iter, s.variant, s.task_channels, s.scale)
          for s in nyud} == {(480, 640, 8, 18, "C", 270, 2)}
  pascal = [r.setting for r in rows if r.group == "pascal"]
  assert {(s.height, s.width, s.batch, s.n_iter) for s in pascal} == {(512, 512, 8, 4)}
  full = {r.setting.impl: r.setting for r in rows if r.group == "fullres"}
  assert set(full) == {"streamed", "materialized"}
  assert all(s.scale == 1 and s.batch == 8 and s.height == 480 for s in full.values())
  # Each side at its best and in float32, and torch.compile, in the NYUD group.
  kinds = {(s.framework, s.dtype, s.torch_mode, s.precision) for s in nyud}
  assert {("jax", "bfloat16", "eager", "tf32"), ("torch", "bfloat16", "eager", "tf32"),
          ("jax", "float32", "eager", "tf32"), ("torch", "float32", "eager", "tf32"),
          ("torch", "bfloat16", "compile", "tf32"),
          ("torch", "float32", "compile", "tf32")} <= kinds
  assert {(r.setting.framework, r.setting.precision) for r in rows if r.group == "fp32"} == {
      ("jax", "fp32"), ("torch", "fp32")}
  assert len({gpu_check._key(r) for r in rows}) == len(rows)  # pylint: disable=protected-access
  # A JAX row is not started with less time left than the first visit's compile of the NYUD step
  # (85-97 s on an H200), which would kill it before its first step; an eager PyTorch row,
  # which compiles nothing, still runs in those seconds.
  assert min(r.min_s for r in rows if r.setting.framework == "jax") >= 100
  assert {r.min_s for r in rows if r.setting.torch_mode == "eager"
          and r.setting.framework == "torch"} == {30}
  # The before/after of bfloat16 IFB products: one row with float32 products, the same setting
  # as the first row otherwise.
  (ifb_f32,) = [r for r in rows if r.setting.ifb_products == "float32"]
  assert ifb_f32.group == "nyud" and ifb_f32.setting.dtype == "bfloat16"
  assert dataclasses.replace(ifb_f32.setting, ifb_products="model") == dataclasses.replace(
      first.setting, profile_dir="")
  # Every JAX row has the longer limits for when it compiles the initialisation too (which
  # run_rows decides: test_rows_that_compile_the_initialisation_get_the_longer_cap).
  assert all(r.cold_cap_s >= 240 and r.cold_min_s >= 190 for r in rows
             if r.setting.framework == "jax")
  assert all(r.cold_cap_s == 0 for r in rows if r.setting.framework == "torch")
  # The before/after of the stacked IFB backward: one row with autodiff's, in the NYUD group
  # (measured on the second visit, so after the rows still unmeasured there).
  (autodiff,) = [r for r in rows if r.setting.ifb_gradient == "autodiff"]
  assert autodiff.group == "nyud" and rows.index(autodiff) > 5
  assert dataclasses.replace(autodiff.setting, ifb_gradient="stacked") == dataclasses.replace(
      first.setting, profile_dir="")
  # Reruns: two identical rows per setting: XLA's defaults without a cache and with a cache of
  # their own, config.deterministic without a cache.
  reruns = [r for r in rows if r.group == "determinism"]
  assert all(r.cache == gpu_check.SHARED_CACHE for r in rows
             if r.group != "determinism" and not r.xla_flags)
  by_setting = {}
  for r in reruns:
    by_setting.setdefault((r.setting, r.cache), []).append(r.label)
  assert sorted((s.deterministic, cache) for s, cache in by_setting) == [
      (False, gpu_check.NO_CACHE), (False, "rerun"), (True, gpu_check.NO_CACHE)]
  assert all(len(labels) == 2 for labels in by_setting.values())
  assert {(s.height, s.width, s.batch, s.dtype) for s, _ in by_setting} == {
      (480, 640, 8, "bfloat16")}


def test_plan_compiles_the_first_row_again_without_autotuning():
  rows = gpu_check.plan(tiny=False, profile_dir="/tmp/p")
  (fast,) = [r for r in rows if r.xla_flags]
  assert fast.xla_flags == "--xla_gpu_autotune_level=0"
  # Compiled by a process of its own (no cached executable, no autotuning results to load).
  assert fast.cache == gpu_check.NO_CACHE and fast.group == "nyud"
  assert fast.setting == dataclasses.replace(rows[0].setting, profile_dir="")
  assert rows.index(fast) <= 5


def test_from_row_goes_on_where_a_first_command_stopped(tmp_path, monkeypatch):
  seen = []

  def fake_run_rows(rows, *args, **kwargs):
    seen.extend(gpu_check._key(r) for r in rows)  # pylint: disable=protected-access
    return []

  def no_flops(rows, timeout_s, pool):
    return pool.submit(dict)

  monkeypatch.setattr(gpu_check, "run_rows", fake_run_rows)
  monkeypatch.setattr(gpu_check, "start_flops_count", no_flops)
  gpu_check.main([str(tmp_path), "--tiny", "--phases", "bench", "--groups", "nyud,pascal",
                  "--from-row", "nyud: PT compile bf16"])
  planned = [gpu_check._key(r)  # pylint: disable=protected-access
             for r in gpu_check.plan(tiny=True, profile_dir="") if r.group in ("nyud", "pascal")]
  assert seen == planned[planned.index("nyud: PT compile bf16"):]
  assert seen[0] == "nyud: PT compile bf16" and seen[-1].startswith("pascal: ")
  with pytest.raises(SystemExit):
    gpu_check.main([str(tmp_path), "--tiny", "--phases", "bench", "--groups", "pascal",
                    "--from-row", "nyud: PT compile bf16"])


def _row(label, framework, images_per_s, dtype="bfloat16", mode="eager", group="nyud", **kw):
  setting = Setting(framework=framework, impl="materialized", dataset="nyud", height=480,
                    width=640, batch=8, n_iter=18, variant="C", task_channels=270, dtype=dtype,
                    steps=10, warmup=2, precision="tf32", torch_mode=mode, **kw)
  out = {**setting.__dict__, "group": group, "label": label}
  if images_per_s:
    out.update(images_per_s=images_per_s, step_s=8 / images_per_s, compile_s=30.0,
               peak_bytes=2**30)
  return out


def test_derive_and_targets_arithmetic():
  rows = [_row("JAX bf16", "jax", 80.0), _row("PT eager bf16", "torch", 30.0),
          _row("PT compile bf16", "torch", 100.0, mode="compile"),
          _row("JAX f32", "jax", 40.0, dtype="float32"),
          {**_row("PT eager f32", "torch", None), "error": "boom"}]
  key = gpu_check.flops_key(Setting(**{k: rows[0][k] for k in Setting.__dataclass_fields__}))
  flops = {key: {"forward_gflops_per_image": 500.0}}
  gpu_check.derive(rows, flops, gpu_check.DATASHEET_TFLOPS["H100 SXM"],
                   {"nyud: JAX bf16": {"compile_s": 42.0}})
  jax_row = rows[0]
  assert jax_row["precompile_s"] == 42.0
  assert jax_row["model_tflop_per_step"] == pytest.approx(3 * 500 * 8 / 1e3)
  assert jax_row["model_tflops"] == pytest.approx(12.0 / 0.1)
  assert jax_row["fraction_of_peak"] == pytest.approx(120.0 / 989.4)
  assert rows[3]["fraction_of_peak"] == pytest.approx(60.0 / 494.7)  # float32 in TF32
  # NYUD: 795 // 8 = 99 steps per epoch, 100 epochs.
  assert jax_row["full_run_steps"] == 9900
  assert jax_row["projected_full_run_min"] == pytest.approx(9900 * 0.1 / 60)
  assert "model_tflops" not in rows[4]
  lines = gpu_check.targets(rows, tiny=False)
  assert "JAX >= 2x PyTorch eager: 2.67x" in lines[1] and lines[1].endswith("met")
  assert "JAX >= 1x torch.compile: 0.80x" in lines[2] and lines[2].endswith("MISSED")
  assert "16.5 min projected" in lines[3] and lines[3].endswith("MISSED")
  table = gpu_check.format_table(rows)
  assert "nyud: PT eager f32" in table and "FAILED: boom" in table
  assert "12.1%" in table  # 120 of 989.4 TFLOP/s


def test_full_resolution_verdict():
  streamed = _row("s", "jax", 2.0, group="fullres", scale=1)
  streamed["impl"] = "streamed"
  hint = ("IFBOutOfMemoryError: out of device memory (...) Set model.tpim.ifb_impl=streamed "
          "(launch.py ...)")
  failed = {**_row("m", "jax", None, group="fullres", scale=1), "error": hint}
  text = gpu_check.full_resolution_verdict([streamed, failed])
  assert "streamed: ran at batch 8" in text and "as required" in text
  assert "materialized: failed with the hint, as required" in text
  bare = {**failed, "error": "JaxRuntimeError: RESOURCE_EXHAUSTED"}
  assert "WITHOUT the hint" in gpu_check.full_resolution_verdict([bare])


def test_compile_verdict():
  default = {**_row("JAX bf16", "jax", 50.0), "compile_s": 12.0, "lower_s": 10.0,
             "init_s": 8.0, "precompile_s": 90.0}
  fast = {**_row("JAX bf16 autotune 0", "jax", 40.0), "compile_s": 40.0, "lower_s": 10.0,
          "init_s": 5.0}
  text = gpu_check.compile_verdict([default, fast, _row("PT eager bf16", "torch", 30.0)])
  assert ("XLA defaults (JAX bf16): 90.0 s = 10.0 s tracing and lowering + 80.0 s in XLA "
          "(compiled ahead, during the tests); step 160.0 ms; initialisation 8.0 s") in text
  assert ("without autotuning (JAX bf16 autotune 0): 40.0 s = 10.0 s tracing and lowering + "
          "30.0 s in XLA; step 200.0 ms") in text
  assert ("without autotuning: XLA's part 0.38x, the initialisation 0.62x, the step 1.250x "
          "the defaults'") in text
  text = gpu_check.compile_verdict([default])
  assert "without autotuning: not measured" in text and "XLA's part" not in text


def test_rerun_verdict():
  def run(label, deterministic, digest, images_per_s, loss=1.5, cache=gpu_check.NO_CACHE,
          compile_s=30.0):
    row = _row(label, "jax", images_per_s, group="determinism", deterministic=deterministic)
    row["cache"] = cache
    if digest:
      row.update(state_sha256=digest, loss=loss, compile_s=compile_s)
    return row

  rows = [run("d1", False, "aa", 50.0), run("d2", False, "ab", 52.0, loss=1.50001),
          run("c1", False, "ee", 51.0, cache="rerun", compile_s=61.0),
          run("c2", False, "ee", 51.5, cache="rerun", compile_s=2.5),
          run("x1", True, "cc", 40.0), run("x2", True, "cc", 39.0)]
  text = gpu_check.rerun_verdict(rows)
  assert ("XLA defaults, each process compiling and autotuning for itself: parameters and "
          "BatchNorm statistics after 13 steps DIFFER") in text
  assert ("the second process loading the first's executables (a run resumed by launch.py): "
          "parameters and BatchNorm statistics after 13 steps bit-identical in both runs") in text
  assert "lower+compile: 61.0 s in the first run, 2.5 s in the second (loading it)" in text
  assert ("config.deterministic, each process compiling for itself: parameters and BatchNorm "
          "statistics after 13 steps bit-identical in both runs") in text
  # The speed comparison is between the rows that compiled for themselves.
  assert "config.deterministic runs at 0.77x the defaults' images/s (40.00 vs 52.00)" in text
  failed = {**run("x2", True, None, None), "error": "timed out after 150 s (killed)"}
  text = gpu_check.rerun_verdict(rows[:5] + [failed])
  assert "config.deterministic, each process compiling for itself: not measured (1 of 2 runs: " \
      "timed out after 150 s" in text
  assert "runs at" not in text
  skipped = {**run("c2", False, None, None, cache="rerun"), "skipped": "out of time budget"}
  text = gpu_check.rerun_verdict(rows[:3] + [skipped])
  assert "(a run resumed by launch.py): not measured (1 of 2 runs: out of time budget)" in text


def test_each_row_gets_the_compilation_cache_it_asks_for(monkeypatch, tmp_path):
  """Shared rows: the visit's cache; uncached rows: none at all; the rows of a cache of their own:
  one folder, empty at the first of them."""
  seen = []

  def fake_measure(setting, timeout_s=None, log_path="", compile_only=False, env=None):
    cache = env.get("JAX_COMPILATION_CACHE_DIR")
    entries = sorted(os.listdir(cache)) if cache and cache != "/c" else None
    seen.append((env, entries))
    if entries is not None:
      pathlib.Path(cache, "entry").write_text("")  # what the first process writes
    return {**setting.__dict__, "images_per_s": 1.0}

  monkeypatch.setattr(gpu_check.train_step, "_measure_in_subprocess", fake_measure)
  planned = gpu_check.plan(tiny=True, profile_dir="")
  rows = ([r for r in planned if r.group == "determinism"] + planned[:1]
          + [r for r in planned if r.xla_flags])
  env_flags = "--xla_dump_to=/x"
  env = gpu_check.child_env(JAX_COMPILATION_CACHE_DIR="/c",
                            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", OTHER="1",
                            XLA_FLAGS=env_flags)
  kept = []
  results = gpu_check.run_rows(rows, gpu_check.Clock(600), env, tmp_path / "log", 0, True,
                               on_row=lambda partial: kept.append(len(partial)))
  assert kept == list(range(1, len(rows) + 1)), "every finished row is handed on at once"
  assert [r["cache"] for r in results] == [r.cache for r in rows]
  assert all(row_env["OTHER"] == "1" for row_env, _ in seen)
  # A row's own XLA flags come after the visit's; the other rows get the visit's alone.
  for row, (row_env, _), result in zip(rows, seen, results):
    want = f"{env_flags} {row.xla_flags}" if row.xla_flags else env_flags
    assert row_env["XLA_FLAGS"] == want, row.label
    assert result.get("xla_flags") == (row.xla_flags or None), row.label
  for row, (row_env, entries) in zip(rows, seen):
    cache_variables = {k: v for k, v in row_env.items()
                       if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    if row.cache == gpu_check.NO_CACHE:
      assert not cache_variables, row.label
    elif row.cache == gpu_check.SHARED_CACHE:
      assert cache_variables["JAX_COMPILATION_CACHE_DIR"] == "/c", row.label
    else:
      assert cache_variables["JAX_COMPILATION_CACHE_DIR"] != "/c", row.label
  own = [(row_env["JAX_COMPILATION_CACHE_DIR"], entries) for row, (row_env, entries)
         in zip(rows, seen) if row.cache == "rerun"]
  assert len(own) == 2 and own[0][0] == own[1][0]
  assert [entries for _, entries in own] == [[], ["entry"]]


def test_rows_that_compile_the_initialisation_get_the_longer_cap(monkeypatch, tmp_path):
  """The H200's second visit: the first JAX row compiled the initialisation for 69 s and the
  step for 88 s, and its 150 s cap killed it; a later row of the same model loaded the
  initialisation from the cache. The longer cap goes to each row that compiles it: the first of
  a model and cache, and rows without a cache."""
  calls = []

  def fake_measure(setting, timeout_s=None, log_path="", compile_only=False, env=None):
    calls.append(timeout_s)
    if len(calls) == 1:  # killed while compiling the initialisation: still not in the cache
      return {**setting.__dict__, "timed_out": True, "error": "timed out after 240 s (killed); "
              "last progress: initialising the parameters (compiling the initialisation)"}
    if len(calls) == 2:  # killed while compiling the step: the initialisation is cached
      return {**setting.__dict__, "timed_out": True, "error": "timed out after 240 s (killed); "
              "last progress: lowered in 6.0 s; compiling the train step"}
    return {**setting.__dict__, "step_s": 0.1, "images_per_s": 80.0, "init_s": 1.0}

  monkeypatch.setattr(gpu_check.train_step, "_measure_in_subprocess", fake_measure)
  plan = gpu_check.plan(tiny=False, profile_dir="")
  by_key = {gpu_check._key(r): r for r in plan}  # pylint: disable=protected-access
  order = ["nyud: JAX bf16", "nyud: JAX bf16", "nyud: PT eager bf16", "nyud: JAX f32 TF32",
           "nyud: JAX bf16 autotune 0", "pascal: JAX bf16", "pascal: JAX f32 TF32",
           "determinism: JAX bf16 cache run 1", "determinism: JAX bf16 cache run 2",
           "determinism: JAX bf16 run 2"]
  results = gpu_check.run_rows([by_key[k] for k in order], gpu_check.Clock(10_000), {},
                               tmp_path / "log", 0, True)
  assert calls == [240, 240, 120, 150, 240, 240, 150, 240, 150, 240]
  assert [r["label"] for r in results] == [k.split(": ", 1)[1] for k in order]


@pytest.mark.parametrize("budget_s, cap_s, killed_by", [(100, 240, "budget"), (600, 240, "cap")])
def test_a_row_killed_by_the_budgets_end_is_out_of_time_not_failed(monkeypatch, tmp_path,
                                                                   budget_s, cap_s, killed_by):
  """A row started with less time left than its cap and killed at the budget's end is a row to
  run again (--from-row), not a failure that turns the visit's exit status to 1 (the image
  rehearsal: 'pascal: JAX bf16' started with 34 s left, killed, exit 1); a row killed by its own
  cap stays a failure."""
  timeouts = []

  def fake_measure(setting, timeout_s=None, log_path="", compile_only=False, env=None):
    timeouts.append(timeout_s)
    return {**setting.__dict__, "error": f"timed out after {timeout_s:.0f} s (killed)",
            "timed_out": True}

  monkeypatch.setattr(gpu_check.train_step, "_measure_in_subprocess", fake_measure)
  row = dataclasses.replace(gpu_check.plan(tiny=True, profile_dir="")[0], cap_s=cap_s)
  [result] = gpu_check.run_rows([row], gpu_check.Clock(budget_s), {}, tmp_path / "log", 0, True)
  if killed_by == "budget":
    assert timeouts[0] < cap_s
    assert "error" not in result
    assert result["skipped"].startswith("out of time budget (killed after ")
    assert f"before its {cap_s} s cap" in result["skipped"]
  else:
    assert timeouts == [cap_s]
    assert result["error"] == f"timed out after {cap_s} s (killed)" and "skipped" not in result
  table = gpu_check.format_table([result])
  assert ("FAILED" in table) == (killed_by == "cap"), table


@pytest.mark.parametrize("workers", [1, 2])
def test_tests_phase_keeps_the_report_of_a_failure_when_pytest_is_killed(tmp_path, monkeypatch,
                                                                           workers):
  """The visit's pytest prints each failure as it happens (tests/conftest.py's
  --report-failures-at-once), so the phase records why a test failed even when its time limit
  kills pytest before the summary (the H200's first visit lost that); in one process or in
  several (pytest-xdist, whose lines read differently)."""
  tests = tmp_path / "tests"
  tests.mkdir()
  (tests / "test_planted.py").write_text(
      "import time\n"
      "def test_fails():\n    assert 1 + 1 == 3, 'planted failure'\n"
      "def test_passes():\n    pass\n"
      "def test_hangs():\n    time.sleep(600)\n")
  (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p tests.conftest\n")
  # pytest runs in tmp_path as it runs in the repository on the visit; the planted folder has no
  # __init__.py, so `tests.conftest` is still the repository's.
  monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
  monkeypatch.setattr(gpu_check, "REPO_ROOT", tmp_path)
  result = gpu_check.tests_phase(["tests/test_planted.py"], 30, tmp_path / "tests.log", "cpu",
                                 workers)
  assert result["workers"] == workers
  assert result["timed_out"] and result["failed"] == 1 and result["passed"] == 1, result
  (name,) = result["failed_tests"]
  assert name == "tests/test_planted.py::test_fails"
  assert "planted failure" in result["failure_reports"][name]
  text = gpu_check.format_tests(result)
  assert "TIMED OUT" in text and "AssertionError: planted failure" in text, text
  assert ("2 processes" in text) == (workers == 2), text


def test_pipeline_phase_times_each_setting_and_keeps_figures_past_a_failure(tmp_path,
                                                                            monkeypatch):
  log = tmp_path / "pipeline.log"
  rows = gpu_check.pipeline_phase(tiny=True, timeout_s=120, log=log)
  assert [(r["read_threads"], r["workers"]) for r in rows[0]["rates"]] == [(1, 0), (2, 0)]
  assert all(r["images_per_s"] > 0 for r in rows[0]["rates"]) and "error" not in rows[0]
  bench = [{"dataset": "nyud", "framework": "jax", "group": "nyud", "images_per_s": 1e9}]
  line = gpu_check.format_pipeline(rows, bench)
  assert "images/s with 0 workers, 2 threads" in line and "FALLS BEHIND" in line, line

  # At the paper's sizes: threads in the training process first (NYUD, then PASCAL), then
  # worker processes; a run that times out (the H200's 14 workers) loses only its own figures.
  commands = []

  def fake_run(cmd, timeout_s, env, log_path):
    commands.append(cmd)
    if cmd[cmd.index("--workers") + 1] != "0":
      return None, "prepared the array_record copy in 1.0 s"
    return 0, "\n".join(f"X train pipeline, read_threads={t}, workers=0: 50.0 images/s"
                        for t in cmd[cmd.index("--read-threads") + 1:cmd.index("--steps")])

  monkeypatch.setattr(gpu_check, "run_limited", fake_run)
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pipeline, "available_cores", lambda: 16)
  rows = gpu_check.pipeline_phase(tiny=False, timeout_s=600, log=log)
  settings = [(c[c.index("--dataset") + 1], c[c.index("--workers") + 1],
               c[c.index("--read-threads") + 1:c.index("--steps")]) for c in commands]
  assert settings == [("nyud", "0", ["2", "8"]), ("pascal", "0", ["2", "8"]),
                      ("nyud", "8", ["2"]), ("pascal", "8", ["2"])]
  assert [r["dataset"] for r in rows] == ["nyud", "pascal"]
  for row in rows:
    assert [(r["read_threads"], r["workers"]) for r in row["rates"]] == [(2, 0), (8, 0)]
    assert row["error"] == "workers 8: timed out"
  assert "ERROR workers 8: timed out" in gpu_check.format_pipeline(rows, bench)


def test_profile_summary_reads_a_real_trace(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(x).block_until_ready()
  summary = profile_summary.summarize(tmp_path, steps=2, module_contains="")
  assert summary["events"] >= 2 and summary["ms_per_step"] > 0
  assert summary["top_ops"] and sum(r["percent"] for r in summary["top_ops"]) <= 100.0 + 1e-6
  assert "top operations" in profile_summary.format_summary(summary)
  kernels = summary["top_kernels"]
  assert kernels and sum(r["percent"] for r in kernels) <= 100.0 + 1e-6
  assert all(not re.search(r"[._]\d+$", r["name"]) for r in kernels), kernels
  assert "top kernels" in profile_summary.format_summary(summary)
  with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb"):
    profile_summary.summarize(tmp_path / "empty")


def test_profile_summary_names_the_heaviest_kernels_inside_an_operation():
  """A CUDA-graph command buffer (an XLA loop) is one operation of many kernels: its row names
  the two heaviest with their shares, not the first to run."""
  events = [("command_buffer_12", "jit_train_step", "memcpy32_post", 1e3)]
  for i in range(4):
    events += [("command_buffer_12", "jit_train_step", f"sm90_xmma_gemm_bf16_{i}", 60e3),
               ("command_buffer_12", "jit_train_step", f"loop_add_fusion_{i}", 15e3)]
  events.append(("cudnn-conv.3", "jit_train_step", "cudnn-conv.3", 100e3))
  summary = profile_summary.summarize_events(events, "test events", steps=2)
  loop, conv = summary["top_ops"]
  assert (loop["name"], loop["ms_per_step"]) == ("command_buffer_12", 0.1505)
  assert [(k["name"], round(k["percent_of_op"], 1)) for k in loop["kernels"]] == [
      ("sm90_xmma_gemm_bf16", 79.7), ("loop_add_fusion", 19.9)]
  assert "kernels" not in conv  # one kernel, its own name
  text = profile_summary.format_summary(summary)
  assert "command_buffer_12  [sm90_xmma_gemm_bf16 80%, loop_add_fusion 20%]" in text
  assert summary["top_kernels"][0]["name"] == "sm90_xmma_gemm_bf16"


def _fake_wheel(path, name, requires):
  with zipfile.ZipFile(path, "w") as z:
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0",
                      *[f"Requires-Dist: {r}" for r in requires]]) + "\n"
    z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
  return path


def test_missing_requirements_against_the_image(tmp_path):
  _fake_wheel(tmp_path / "demo-1.0-py3-none-any.whl", "demo", [
      "numpy", "ml-collections", "not-on-the-image", "jax>=0.12", "torch<3",
      'tensorflow; extra == "tf"', 'backport; python_version < "3.9"'])
  _fake_wheel(tmp_path / "ml_collections-1.0-py3-none-any.whl", "ml_collections", ["absl-py"])
  missing = gpu_image.missing_requirements(sorted(tmp_path.glob("*.whl")))
  assert missing["ml_collections-1.0-py3-none-any.whl"] == []
  problems = missing["demo-1.0-py3-none-any.whl"]
  assert len(problems) == 2, problems
  assert "not-on-the-image (not in the image, not carried)" in problems[0]
  assert "jax>=0.12 (the image has jax 0.11.2)" in problems[1]


def test_rehearsal_requirements_pin_the_image_and_leave_out_tensorflow_and_the_wheels(tmp_path):
  reqs = tmp_path / "requirements.txt"
  reqs.write_text("jax==0.10.2  # ours\nflax==0.12.8\nml-collections==1.1.0\n"
                  "tensorflow-cpu==2.21.0\npyedgeeval==0.2.8\n\n")
  dev = tmp_path / "requirements-dev.txt"
  dev.write_text("torch==2.14.1\nnbclient==0.11.0\npytest\n")
  wheels = [_fake_wheel(tmp_path / "ml_collections-1.0-py3-none-any.whl", "ml_collections",
                        ["absl-py", "pyyaml", 'tensorflow; extra == "tf"']),
            _fake_wheel(tmp_path / "promise-1.0-py3-none-any.whl", "promise", ["six"])]
  lines = gpu_image.rehearsal_requirements([reqs, dev], wheels)
  assert lines == sorted(lines)
  # The image's known versions win over ours; its other packages float; what it lacks and the
  # tests need stays pinned; TensorFlow and the carried distributions are left out.
  # Every version known on the image is pinned (flax==0.12.8 of ours gives way to the image's).
  known = {f"{name}=={version}" for name, version in gpu_image.IMAGE_VERSIONS.items()
           if name != "python"}
  assert {"jax==0.11.2", "torch==2.11.0", "flax==0.12.10", "absl-py==2.5.0"} <= known
  assert known | {"pytest", "pyedgeeval==0.2.8", "nbclient==0.11.0", "six"} == set(lines)


def test_gpu_wheels_list_pins_every_line():
  lines = [l.split("#")[0].strip() for l in
           (REPO_ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()]
  specs = [l for l in lines if l]
  assert specs and all(l.count("==") == 1 for l in specs), specs
  names = [gpu_image.normalize(l.split("==")[0]) for l in specs]
  assert len(set(names)) == len(names)
  assert not set(names) & gpu_image.IMAGE_PACKAGES  # carried only what the image lacks
  assert {"ml-collections", "clu"} <= set(names)


@pytest.mark.slow
def test_gpu_check_dry_run_through_the_shell_script(tmp_path):
  """The visit's command at tiny shapes on the CPU: every phase, one JAX and one PyTorch row.

  The determinism group's reruns are left out (two JAX compiles without a cache, 200 s of the
  suite): their verdict is tests/benchmarks/test_gpu_check.py::test_rerun_verdict, the rows'
  caches test_each_row_gets_the_compilation_cache_it_asks_for, and the digest they compare is
  checked here on the JAX row."""
  out = tmp_path / "out"
  env = {**gpu_check.child_env(), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "OMP_NUM_THREADS": "1"}
  done = subprocess.run(
      ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--tiny",
       "--rows", "nyud: JAX bf16,nyud: PT eager f32 TF32,nyud: PT compile bf16",
       # The visit's 530 s budget is the device tool's limit; here the dry run took 519 s of it
       # with two more JAX rows (2-core CPU), so a slower machine gets room before the
       # subprocess's own limit.
       "--precompile", "1", "--torch-device", "cpu", "--budget-s", "780"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert {p.name for p in out.iterdir()} <= {"summary.txt", "results.json", "tests.log",
                                             "rows.log", "pipeline.log", "train.log",
                                             "console.log"}
  summary = (out / "summary.txt").read_text()
  results = json.loads((out / "results.json").read_text())
  assert results["tests"]["passed"] > 0 and results["tests"]["failed"] == 0
  assert results["tests"]["workers"] == 2  # pytest-xdist, as on the GPU
  rows = {r["label"]: r for r in results["bench"]}
  # The compile split into Python's lowering and XLA's part (the row without autotuning is left
  # out here: its flag means nothing to XLA's CPU backend, and the budget keeps the training run).
  assert 0 < rows["JAX bf16"]["lower_s"] < rows["JAX bf16"]["compile_s"]
  assert "XLA defaults (JAX bf16): " in summary and "s tracing and lowering + " in summary
  assert "without autotuning: not measured" in summary
  assert set(rows) == {"JAX bf16", "PT eager f32 TF32", "PT compile bf16"}
  # The digest of the parameters and BatchNorm statistics that the reruns compare.
  digest = rows["JAX bf16"]["state_sha256"]
  assert len(digest) == 64 and int(digest, 16) >= 0, digest
  for label in ("JAX bf16", "PT eager f32 TF32"):
    assert rows[label]["images_per_s"] > 0 and rows[label]["model_tflops"] > 0, rows[label]
    assert rows[label]["projected_full_run_min"] > 0
  assert rows["JAX bf16"]["matmul_precision"] == "jax_default_matmul_precision=tensorfloat32"
  assert rows["JAX bf16"]["precompile_s"] > 0
  assert rows["PT compile bf16"]["skipped"] == "torch.compile rows are not run on a CPU dry run"
  assert rows["JAX bf16"]["profile"]["top_ops"], "the first JAX row is profiled"
  for text in ("tests (ITERFUSE_TEST_PLATFORM=cpu", "nyud: JAX bf16", "targets (tiny dry-run",
               "JAX >= 2x PyTorch eager", "profile of nyud: JAX bf16", "input pipeline nyud 48x64",
               "gpu_check done in"):
    assert text in summary, text
  assert "keeps ahead" in summary or "FALLS BEHIND" in summary
  assert results["pipeline"][0]["rates"][0]["images_per_s"] > 0
  train = results["train"]  # launch.py as a user runs it, last
  assert train["exit"] == 0 and train["evaluations"] == 3 and train["tensorboard_files"] == 1
  assert set(gpu_check.CPU_DEMO) <= set(train["metrics"]), train
  # Its start, from its log.txt: the initialisation and the train step's compile at once.
  assert 0 < train["init_s"] < train["wall_s"] and 0 < train["step_compile_s"] < train["wall_s"]
  assert "and the train step's compile (" in summary
  assert "training run `launch.py --config=configs/demo.py:tiny" in summary
  assert "gpu_check.sh: exit 0" in (out / "console.log").read_text()
