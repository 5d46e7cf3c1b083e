"""Writes quickstart.ipynb from the cells below (edit here, then run this file).

  python notebooks/make_quickstart.py                                # cells only, no outputs
  python notebooks/make_quickstart.py --execute /tmp/iterfuse_demo   # with the outputs (pictures)
                                                                     # of a run on that workdir

The committed notebook carries the outputs of an execution on the README's demo workdir, so that
its pictures show without running it.
"""

import argparse
import os
import pathlib
import sys

import nbformat

CELLS = [
    ("markdown", """# IterFuse quickstart: predictions and attention

From a trained workdir (by default the demo run of the README, `/tmp/iterfuse_demo`) to pictures:
the model's predictions on a validation image, the learned alpha of every Cross-task Interaction
Block, and what one CIB attends to from one pixel, before and through the Iterative Fusion Block
(the paper's Fig. 4). If the workdir holds no checkpoint yet, the next cell trains a small model
into it first (a few minutes on a CPU; set `ITERFUSE_QUICK=1` for a seconds-long toy run,
`configs/demo.py:tiny`)."""),
    ("code", """import os
import pathlib
import sys

import matplotlib.pyplot as plt  # Jupyter draws the figures inline
plt.rcParams["figure.dpi"] = 70
import numpy as np

REPO = pathlib.Path.cwd() if (pathlib.Path.cwd() / "configs").is_dir() else pathlib.Path.cwd().parent
sys.path.insert(0, str(REPO))
from iterfuse_jax import models

WORKDIR = pathlib.Path(os.environ.get("ITERFUSE_WORKDIR", "/tmp/iterfuse_demo"))
QUICK = os.environ.get("ITERFUSE_QUICK", "0") == "1"
print("workdir:", WORKDIR)"""),
    ("code", """if not (WORKDIR / "checkpoints").is_dir():
    import ml_collections
    from configs import demo
    from iterfuse_jax import train

    # QUICK: a toy run for the test suite (48x64 images, 12 steps).
    config = demo.get_config("tiny" if QUICK else "")
    train.train_and_evaluate(config, str(WORKDIR))"""),
    ("code", """predictor = models.load_predictor(WORKDIR)
print(f"{predictor.config.model.name} on {predictor.dataset}, tasks {predictor.tasks}, "
      f"checkpoint step {predictor.step}")
print("learned alpha per CIB:", {k: round(v, 4) for k, v in predictor.alphas().items()})"""),
    ("code", """from PIL import Image

data_dir = pathlib.Path(predictor.config.dataset.data_dir)
image_id = (data_dir / "gt_sets" / "val.txt").read_text().split()[0]
image = models.read_image(data_dir / "images" / f"{image_id}.jpg")
# Ground truth in the NYUD_MT encodings: segmentation 0 = void, 1..40 classes; depth in metres.
seg = np.asarray(Image.open(data_dir / "segmentation" / f"{image_id}.png")).astype(np.int32)
ground_truth = {"semseg": np.where(seg == 0, 255, seg - 1), "depth": np.load(data_dir / "depth" / f"{image_id}.npy")}

prediction = predictor.predict(image)  # at the image's own size
for task, value in prediction.items():
    print(task, value.shape, value.dtype, float(value.min()), float(value.max()))
pred_rgb = predictor.colorize(prediction)
gt_rgb = predictor.colorize(ground_truth)

fig, axes = plt.subplots(1, 5, figsize=(17, 3))
panels = [("input", image), ("semseg: ground truth", gt_rgb["semseg"]), ("semseg: prediction", pred_rgb["semseg"]),
          ("depth: ground truth", gt_rgb["depth"]), ("depth: prediction", pred_rgb["depth"])]
for ax, (title, picture) in zip(axes, panels):
    ax.imshow(picture); ax.set_title(title); ax.axis("off")
fig.tight_layout()
fig.savefig(WORKDIR / "quickstart_predictions.png", dpi=80)
plt.show()"""),
    ("code", """h, w = image.shape[:2]
pixel = (h // 2, w // 2)
att = predictor.attention(image, source="depth", target="semseg", pixel=pixel)
n = att["ifb_row"].shape[0] - 1
print("pooled grid", att["grid"], "pixel on the grid", att["grid_pixel"], "alpha", round(att["alpha"], 4))
print("affinity row sums to", f"{float(att['affinity'].sum()):.6f}")

# Row k of the IFB operator: how much each position contributes to the target pixel after k
# iterations. The pixel's own weight ((1 - alpha)^k for IFB C) would dwarf the rest: it is hidden
# and given in the title.
shown = sorted({1, max(n // 2, 1), n})
fig, axes = plt.subplots(1, 2 + len(shown), figsize=(3.4 * (2 + len(shown)), 3))
axes[0].imshow(image); axes[0].plot(pixel[1], pixel[0], "r+", markersize=14); axes[0].set_title("target pixel")
axes[1].imshow(att["affinity"], cmap="magma"); axes[1].set_title("row of Co (depth -> semseg)")
for ax, k in zip(axes[2:], shown):
    row = att["ifb_row"][k].copy()
    own = row[att["grid_pixel"]]
    row[att["grid_pixel"]] = np.nan
    ax.imshow(row, cmap="magma"); ax.set_title(f"IFB row, iteration {k} (own {own:.2f})")
for ax in axes:
    ax.axis("off")
fig.tight_layout()
fig.savefig(WORKDIR / "quickstart_attention.png", dpi=80)
plt.show()"""),
]


def execute(nb: nbformat.NotebookNode, workdir: str, timeout: int = 1800) -> None:
  """Runs the notebook in a fresh kernel on `workdir`, leaving the outputs in `nb`."""
  import nbclient  # pylint: disable=g-import-not-at-top

  os.environ["ITERFUSE_WORKDIR"] = workdir
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  notebooks = pathlib.Path(__file__).resolve().parent
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": str(notebooks)}}).execute()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--execute", metavar="WORKDIR", default=None,
                      help="run the notebook on this workdir and keep its outputs")
  args = parser.parse_args(argv)
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
              for kind, src in CELLS]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  if args.execute:
    execute(nb, args.execute)
  path = pathlib.Path(__file__).with_name("quickstart.ipynb")
  nbformat.write(nb, path)
  print("wrote", path, f"({path.stat().st_size / 1e3:.0f} kB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
