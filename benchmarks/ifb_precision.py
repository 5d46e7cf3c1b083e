"""Accuracy and time of the IFB's product precisions: float32 against bfloat16 products.

One CIB's global attention as the model computes it, from Q, K and V (post-ReLU-like random
activations): Co = softmax(Q K^T / sqrt(d)), then the IFB (`iterative_fusion`), forward and
backward with a random cotangent. Three settings are compared with the same computation in
float64:

  float32                   model.dtype float32 (the default);
  bf16, float32 products    model.dtype bfloat16, model.tpim.ifb_products "float32";
  bf16, bf16 products       model.dtype bfloat16, model.tpim.ifb_products "model" (the default).

For each: the relative error (Frobenius norm) of the output and of the gradients with respect
to Q, K, V and alpha, and the median time of the jitted forward+backward. The errors of the
bfloat16 settings come mostly from the bfloat16 activations themselves (Q, K, V and the
iterates); the question is what the products add to them.

  python -m benchmarks.ifb_precision                        # NYUD: M = 60 x 80, C 270, n_iter 18
  python -m benchmarks.ifb_precision --grid 16x16 --channels 32 --repeats 1
  python -m benchmarks.ifb_precision --ifb-gradient autodiff     # JAX's derivative of the loop
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np

SETTINGS = (("float32", "float32", None), ("bf16, float32 products", "bfloat16", "float32"),
            ("bf16, bf16 products", "bfloat16", "bfloat16"))
GRADIENTS = ("out", "dQ", "dK", "dV", "dalpha")


def measure(grid: tuple[int, int], channels: int, qk_channels: int, n_iter: int, variant: str,
            repeats: int, seed: int = 0, gradient: str = "stacked") -> list[dict]:
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from iterfuse_jax.models.cross_task import affinity_matrix
  from iterfuse_jax.models.iterative_fusion import iterative_fusion
  # pylint: enable=g-import-not-at-top

  m = grid[0] * grid[1]
  rng = np.random.default_rng(seed)
  q, k = (np.maximum(rng.standard_normal((1, m, qk_channels)), 0) for _ in range(2))
  v = np.maximum(rng.standard_normal((1, m, channels)), 0)
  cotangent = rng.standard_normal((1, m, channels))

  def vjp_fn(dtype, product_dtype):
    def forward(q, k, v, alpha):
      co = affinity_matrix(q.astype(dtype), k.astype(dtype))
      return iterative_fusion(co, v.astype(dtype), alpha, n_iter, variant,
                              product_dtype=product_dtype, gradient=gradient)

    def run(q, k, v, alpha):
      out, pullback = jax.vjp(forward, q, k, v, alpha)
      return (out, *pullback(cotangent.astype(out.dtype)))

    return jax.jit(run)

  with jax.enable_x64():
    reference = [np.asarray(x, np.float64) for x in vjp_fn(jnp.float64, None)(
        q, k, v, np.float64(0.3))]
  rows = []
  inputs = [x.astype(np.float32) for x in (q, k, v)] + [np.float32(0.3)]
  for name, dtype, products in SETTINGS:
    run = vjp_fn(jnp.dtype(dtype), products and jnp.dtype(products))
    got = jax.block_until_ready(run(*inputs))
    times = []
    for _ in range(max(1, repeats)):
      start = time.perf_counter()
      jax.block_until_ready(run(*inputs))
      times.append(time.perf_counter() - start)
    errors = {g: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
              for g, a, b in zip(GRADIENTS, got, reference)}
    rows.append({"setting": name, "step_s": statistics.median(times), **errors})
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ifb_precision",
                                   description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--grid", default="60x80", help="pooled grid HxW (M = H*W positions)")
  parser.add_argument("--channels", type=int, default=270, help="C of V")
  parser.add_argument("--qk-channels", type=int, default=0, help="d of Q and K (0: C // 2)")
  parser.add_argument("--n-iter", type=int, default=18)
  parser.add_argument("--variant", choices=("A", "B", "C"), default="C")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs after the first")
  parser.add_argument("--ifb-gradient", choices=("stacked", "autodiff"), default="stacked",
                      help="the IFB's backward (model.tpim.ifb_gradient) of every setting")
  args = parser.parse_args(argv)
  try:
    grid = tuple(int(x) for x in args.grid.lower().split("x"))
  except ValueError:
    grid = ()
  if len(grid) != 2 or min(grid) < 1:
    parser.error(f"--grid must be HxW with positive H and W, got {args.grid!r}")
  if min(args.channels, args.n_iter) < 1 or args.qk_channels < 0:
    parser.error("--channels and --n-iter must be positive, --qk-channels non-negative")
  d = args.qk_channels or max(args.channels // 2, 1)

  import jax  # pylint: disable=g-import-not-at-top
  rows = measure(grid, args.channels, d, args.n_iter, args.variant, args.repeats,
                 gradient=args.ifb_gradient)
  device = jax.devices()[0]
  print(f"IFB {args.variant} forward+backward from Q, K, V: M = {grid[0]}x{grid[1]} = "
        f"{grid[0] * grid[1]}, C {args.channels}, d {d}, n_iter {args.n_iter}, batch 1, "
        f"{args.ifb_gradient} backward, on "
        f"{device.platform} ({device.device_kind}); relative error against float64")
  print(f"{'setting':24s} {'step s':>7s} " + " ".join(f"{g:>8s}" for g in GRADIENTS))
  for r in rows:
    print(f"{r['setting']:24s} {r['step_s']:7.3f} " + " ".join(f"{r[g]:8.1e}" for g in GRADIENTS))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
