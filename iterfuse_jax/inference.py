"""Load a trained model from its workdir, predict on images of any size, and look inside the CIBs.

  from iterfuse_jax import inference
  predictor = inference.load_predictor("/tmp/iterfuse_demo")        # config.json + checkpoint
  out = predictor.predict(inference.read_image("photo.jpg"))        # {task: [H, W] at photo size}
  rgb = predictor.colorize(out)                                     # {task: [H, W, 3] uint8}
  predictor.alphas()                                                # {"cib_depth_to_semseg": 0.31, ...}
  att = predictor.attention(image, source="depth", target="semseg", pixel=(40, 60))

The same functions are reachable as `iterfuse_jax.models.load_predictor` etc. for notebooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from data_pipelines.normalization import IMAGENET_MEAN, IMAGENET_STD
from iterfuse_jax import determinism
from iterfuse_jax import tasks as task_registry
from iterfuse_jax.models import build_model
from iterfuse_jax.models.iterative_fusion import ifb_update
from iterfuse_jax.models.layers import resize_bilinear
CONFIG_FILE = "config.json"


def read_image(path: str | epath.Path) -> np.ndarray:
  """Reads an image file as RGB uint8 [H, W, 3]; raises naming the file if it cannot."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"))
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def check_rgb(image: np.ndarray) -> np.ndarray:
  """Validates one RGB image [H, W, 3] (uint8 0..255 or float 0..1) and returns it as float32 0..1."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f"expected one RGB image of shape [H, W, 3], got shape {image.shape} (convert grey or "
        "RGBA images to RGB first, e.g. PIL's Image.convert('RGB'))")
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"expected a uint8 or float image, got dtype {image.dtype}")
  if image.min() < 0 or image.max() > 1:
    raise ValueError(f"a float image must hold values in [0, 1], got [{image.min()}, {image.max()}]")
  return image.astype(np.float32)


def normalize(image01: np.ndarray) -> np.ndarray:
  """ImageNet normalisation with the input pipeline's constants: [..., 3] in 0..1 -> float32."""
  return (image01 - IMAGENET_MEAN) / IMAGENET_STD


def load_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
  """The config a training run wrote to `<workdir>/config.json`."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not epath.Path(workdir).is_dir():
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: is {workdir} the workdir of a training run (launch.py writes "
        f"{CONFIG_FILE} there when it starts)?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_variables(workdir: str | epath.Path, config: ml_collections.ConfigDict,
                      which: str = "latest") -> tuple[dict[str, Any], int]:
  """Restores {"params", "batch_stats"} of a checkpoint of `workdir` into the config's model.

  A checkpoint of another config (a different model or size) is an error naming the mismatch.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  model = build_model(config)
  h, w = config.dataset.train_size
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3), jnp.float32), train=False))
  directory = epath.Path(workdir) / ("checkpoints" if which == "latest" else "best")
  if not directory.exists():
    raise FileNotFoundError(f"no {which} checkpoint folder {directory}")
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  step = steps[-1]
  if which == "best":
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        best_fn=lambda m: m["delta_m"], best_mode="max")) as manager:
      step = manager.best_step() or step
  # Restore the parameters only: the optimiser state is of no use for inference.
  state_dir = directory / str(step) / "state"
  # Item-level reads make orbax warn that the step-level metadata file is not in the item folder.
  with _quiet_absl_warnings(), ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(state_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
    stored = {k: tree[k] for k in ("params", "batch_stats")}
    _check_same_structure(abstract, stored, state_dir)
    target = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(
        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), target)
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args,
            partial_restore=True))
  return {"params": restored["params"], "batch_stats": restored["batch_stats"]}, step


@contextlib.contextmanager
def _quiet_absl_warnings():
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _check_same_structure(abstract: Mapping[str, Any], stored: Mapping[str, Any],
                          where: epath.Path) -> None:
  expected = flax.traverse_util.flatten_dict(
      {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}, sep="/")
  got = flax.traverse_util.flatten_dict(
      jax.tree.map(lambda x: x, stored, is_leaf=lambda x: hasattr(x, "shape")), sep="/")
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  shapes = [f"{k}: checkpoint {tuple(got[k].shape)}, model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(got))
            if tuple(got[k].shape) != tuple(expected[k].shape)]
  if missing or extra or shapes:
    raise ValueError(
        f"the checkpoint {where} does not belong to this config's model: "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}, shapes {shapes[:5]}")


@dataclasses.dataclass
class Predictor:
  """A trained model ready to predict on single images of any size.

  Attributes:
    config: the run's config.
    model: the flax module.
    variables: {"params", "batch_stats"}.
    step: the training step of the checkpoint.
  """

  config: ml_collections.ConfigDict
  model: Any
  variables: dict[str, Any]
  step: int = 0

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.config.dataset.tasks)

  @property
  def dataset(self) -> str:
    return self.config.dataset.name

  @property
  def input_size(self) -> tuple[int, int]:
    return tuple(self.config.dataset.eval_size)

  @functools.cached_property
  def _forward(self):
    return jax.jit(lambda variables, x: self.model.apply(variables, x, train=False)["final"],
                   compiler_options=determinism.compiler_options(self.config))

  def predict_logits(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Final logits {task: [H, W, C_task]} at the image's own size.

    image: RGB [H, W, 3], uint8 or float in [0, 1]. It is resized to the model's input size,
    and the logits are resized back bilinearly (as the evaluation does).
    """
    image = check_rgb(image)
    size = image.shape[:2]
    x = resize_bilinear(jnp.asarray(normalize(image))[None], self.input_size)
    logits = self._forward(self.variables, x)
    return {t: np.asarray(resize_bilinear(v, size)[0]) for t, v in logits.items()}

  def predict(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions at the image's size: segmentation [H, W] int32 class ids, depth [H, W]
    float32 metres, saliency and edge [H, W] float32 probability, normals [H, W, 3] float32
    unit vectors."""
    out = {}
    for task, logits in self.predict_logits(image).items():
      kind = task_registry.get_task(task).kind
      if kind == "segmentation":
        out[task] = logits.argmax(-1).astype(np.int32)
      elif kind in ("binary", "boundary"):
        out[task] = jax.nn.sigmoid(logits[..., 0]).astype(np.float32)
      elif kind == "normals":
        norm = np.linalg.norm(logits, axis=-1, keepdims=True)
        out[task] = (logits / (norm + 1e-12)).astype(np.float32)
      else:
        out[task] = logits[..., 0].astype(np.float32)
    return out

  def colorize(self, predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """RGB uint8 [H, W, 3] pictures of `predict`'s outputs (dataset palettes, depth colour map)."""
    from iterfuse_jax import visualization  # pylint: disable=g-import-not-at-top

    return {t: visualization.task_to_rgb(t, self.dataset, np.asarray(p)[None],
                                         is_prediction=False)[0]
            for t, p in predictions.items()}

  def alphas(self) -> dict[str, float]:
    """The learned alpha of every CIB that has one (IFB variants B and C)."""
    flat = flax.traverse_util.flatten_dict(self.variables["params"], sep="/")
    return {name.split("/")[-2]: float(value) for name, value in sorted(flat.items())
            if name.endswith("/alpha")}

  def attention(self, image: np.ndarray, source: str, target: str,
                pixel: tuple[int, int]) -> dict[str, Any]:
    """What CIB(source -> target) attends to from one target pixel, and how the IFB spreads it.

    Args:
      image: RGB [H, W, 3].
      source, target: the task pair.
      pixel: (row, col) in the image's own coordinates.

    Returns a dict with `affinity` ([h, w] float32: the row of Co for the pixel's position on the
    CIB's pooled grid, summing to 1), `ifb_iterates` ([n_iter + 1, h, w] float32: the L2 norm over
    channels of each IFB iterate V^0..V^n), `ifb_row` ([n_iter + 1, h, w]: the row of the
    effective operator (alpha Co + (1 - alpha) I)^k for the pixel, variant-dependent), `grid`
    (h, w) and `grid_pixel` (the pixel on that grid).
    """
    image01 = check_rgb(image)
    for name, task in (("source", source), ("target", target)):
      if task not in self.tasks:
        raise ValueError(f"{name} task {task!r} is not one of the model's tasks {self.tasks}")
    if source == target:
      raise ValueError("the diagonal of the TPIM is the identity: source and target must differ")
    tpim = self.config.model.get("tpim")
    if self.config.model.name != "iterfuse" or tpim is None:
      raise ValueError(f"attention inspection needs an IterFuse model, not {self.config.model.name!r}")
    if tpim.ifb_impl != "materialized":
      raise ValueError("attention inspection needs model.tpim.ifb_impl='materialized' (the "
                       "streamed IFB never builds Co); the weights are the same, so override it")
    h_img, w_img = image01.shape[:2]
    row, col = pixel
    if not (0 <= row < h_img and 0 <= col < w_img):
      raise ValueError(f"pixel {pixel} is outside the image of size {(h_img, w_img)}")

    x = resize_bilinear(jnp.asarray(normalize(image01))[None], self.input_size)
    _, state = self.model.apply(self.variables, x, train=False, mutable=["intermediates"])
    cib = state["intermediates"]["distillation"][f"cib_{source}_to_{target}"]
    co = np.asarray(cib["affinity"][0][0])  # [M, M]
    values = np.asarray(cib["values"][0][0])  # [M, C]
    gh, gw = (int(v) for v in np.asarray(cib["grid"][0]))
    gr = min(int(row * gh / h_img), gh - 1)
    gc = min(int(col * gw / w_img), gw - 1)
    index = gr * gw + gc

    variant = tpim.variant if tpim.use_ifb else "A"
    n_iter = tpim.n_iter if tpim.use_ifb else 1
    alpha = self.alphas().get(f"cib_{source}_to_{target}", 0.0)
    iterates, rows = [values], [np.eye(co.shape[0], dtype=np.float32)[index]]
    for _ in range(n_iter):
      iterates.append(np.asarray(ifb_update(co @ iterates[-1], iterates[-1], alpha, variant)))
      rows.append(np.asarray(ifb_update(rows[-1] @ co, rows[-1], alpha, variant)))
    return {
        "affinity": co[index].reshape(gh, gw),
        "ifb_iterates": np.stack([np.linalg.norm(v, axis=-1).reshape(gh, gw) for v in iterates]),
        "ifb_row": np.stack([r.reshape(gh, gw) for r in rows]),
        "grid": (gh, gw),
        "grid_pixel": (gr, gc),
        "alpha": alpha,
    }


def load_predictor(workdir: str | epath.Path, which: str = "latest",
                   config: ml_collections.ConfigDict | None = None) -> Predictor:
  """Builds the model of a training workdir and restores its latest (or best) checkpoint."""
  config = config if config is not None else load_config(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pretrained = ""  # the checkpoint holds the weights; no ImageNet file is needed
  variables, step = restore_variables(workdir, config, which)
  return Predictor(config=config, model=build_model(config), variables=variables, step=step)
