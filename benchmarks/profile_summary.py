"""Top XLA operations by time in a `jax.profiler` trace, read without TensorFlow or TensorBoard.

`jax.profiler.trace(dir)` writes `plugins/profile/<run>/<host>.xplane.pb`; jaxlib's own reader
(`jax.profiler.ProfileData`) opens it. Every event that XLA annotated with the HLO operation it
ran (an `hlo_op` statistic) counts: on a GPU the kernels on the device's streams, on a CPU the
thunks of the host's XLA threads. Events are summed per HLO operation and per kind of operation
(the name without its ".N" suffix: "fusion", "cudnn-conv-bw-filter", "gemm_fusion", ...), and per
kernel (the event's own name without a trailing "_N" or ".N": a cuBLAS or cuDNN kernel, an XLA
fusion's kind; on a CPU the thunk's HLO name), divided by the number of profiled steps. The
per-kernel table sees inside CUDA-graph command buffers, which XLA on a GPU records as one
"command_buffer_N" operation each: the H200's first profile (benchmarks/README.md) showed four
of them as half of the step, with nothing of what ran inside. Each operation's row names its two
heaviest kernels and their shares of its time (that first summary named each operation's first
kernel, a copy, which said nothing about where a loop's time went).

  python -m benchmarks.profile_summary /tmp/trace --steps 3
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys
from collections.abc import Sequence


def _xplane_files(directory: str | pathlib.Path) -> list[pathlib.Path]:
  return sorted(pathlib.Path(directory).glob("**/*.xplane.pb"))


def _kind(op: str) -> str:
  return re.sub(r"(\.\d+)+$", "", op)


def _kernel_kind(name: str) -> str:
  return re.sub(r"([._]\d+)+$", "", name)[:100]


def summarize(directory: str | pathlib.Path, steps: int = 1, top: int = 15,
              module_contains: str = "train_step") -> dict:
  """{"source", "ms_per_step", "top_ops", "top_kinds", "top_kernels"} of the newest trace.

  Device planes (a GPU's) are used when they hold annotated events, else the host's. Events of
  the modules whose name contains `module_contains` count when there are any, else all.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  files = _xplane_files(directory)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {directory}: was jax.profiler.trace run?")
  path = max(files, key=lambda p: p.stat().st_mtime)
  data = ProfileData.from_file(str(path))
  events = {"device": [], "host": []}
  for plane in data.planes:
    where = "device" if plane.name.startswith("/device:") else "host"
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        if op:
          events[where].append((str(op), str(stats.get("hlo_module", "")), event.name,
                                float(event.duration_ns)))
  source = "device" if events["device"] else "host"
  chosen = events[source]
  in_module = [e for e in chosen if module_contains and module_contains in e[1]]
  return summarize_events(in_module or chosen, f"{source} events with an hlo_op ({path.name})",
                          steps, top)


def summarize_events(events: Sequence[tuple[str, str, str, float]], source: str,
                     steps: int = 1, top: int = 15) -> dict:
  """The summary of `events`, (hlo_op, hlo_module, kernel name, duration in ns) each.

  An operation's row names its heaviest kernels and their shares of its time: a CUDA-graph
  command buffer (an XLA loop, say) is one operation whose kernels are many.
  """
  per_op = collections.defaultdict(lambda: [0.0, 0])
  op_kernels = collections.defaultdict(collections.Counter)  # op: {kernel kind: ns}
  per_kind = collections.defaultdict(lambda: [0.0, 0])
  per_kernel = collections.defaultdict(lambda: [0.0, 0])
  for op, _, name, ns in events:
    kernel = per_kernel[_kernel_kind(name)]
    kernel[0] += ns
    kernel[1] += 1
    per_op[op][0] += ns
    per_op[op][1] += 1
    op_kernels[op][_kernel_kind(name)] += ns
    per_kind[_kind(op)][0] += ns
    per_kind[_kind(op)][1] += 1
  total = sum(v[0] for v in per_op.values()) or 1.0
  steps = max(1, steps)

  def rows(table, with_kernels):
    out = []
    for name, values in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
      row = {"name": name, "ms_per_step": values[0] / 1e6 / steps,
             "percent": 100.0 * values[0] / total, "events_per_step": values[1] / steps}
      heaviest = op_kernels[name].most_common(2) if with_kernels else []
      if heaviest and [k for k, _ in heaviest] != [_kernel_kind(name)]:
        row["kernels"] = [{"name": k[:120], "percent_of_op": 100.0 * ns / (values[0] or 1.0)}
                          for k, ns in heaviest]
      out.append(row)
    return out

  return {"source": source, "ms_per_step": total / 1e6 / steps, "events": len(events),
          "top_ops": rows(per_op, True), "top_kinds": rows(per_kind, False),
          "top_kernels": rows(per_kernel, False)}


def format_summary(summary: dict) -> str:
  lines = [(f"profile: {summary['ms_per_step']:.2f} ms of annotated XLA work per step "
            f"({summary['source']})"), f"{'ms/step':>9s} {'%':>6s}  top operation kinds"]
  lines += [f"{r['ms_per_step']:9.3f} {r['percent']:6.1f}  {r['name']}"
            for r in summary["top_kinds"]]
  lines.append(f"{'ms/step':>9s} {'%':>6s}  top operations")
  lines += [f"{r['ms_per_step']:9.3f} {r['percent']:6.1f}  {r['name']}"
            + ("  [" + ", ".join(f"{k['name']} {k['percent_of_op']:.0f}%" for k in r["kernels"])
               + "]" if r.get("kernels") else "") for r in summary["top_ops"]]
  if summary.get("top_kernels"):
    lines.append(f"{'ms/step':>9s} {'%':>6s}  top kernels (inside command buffers too)")
    lines += [f"{r['ms_per_step']:9.3f} {r['percent']:6.1f}  {r['name']}"
              for r in summary["top_kernels"]]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_summary",
                                   description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("directory")
  parser.add_argument("--steps", type=int, default=1, help="profiled steps (for per-step times)")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  summary = summarize(args.directory, args.steps, args.top)
  print(format_summary(summary))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
