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
from iterfuse_jax import eval_resizing
from iterfuse_jax import tasks as task_registry
from iterfuse_jax.models import build_model
from iterfuse_jax.models.iterative_fusion import ifb_update

CONFIG_FILE = "config.json"


# 16-bit greyscale modes (16-bit PNGs and TIFFs): scaled to 8 bits, 65535 -> 255.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str | epath.Path) -> np.ndarray:
  """Reads an image file as RGB uint8 [H, W, 3], as it is displayed; raises naming the file if it
  cannot.

  The EXIF orientation is applied (phone photos store the sensor's landscape pixels and a tag
  that rotates them). 16-bit greyscale images (modes I;16*) are scaled to 8 bits by rounding
  v / 257, so that 65535 is 255; 32-bit integer and float images (modes I and F) have no
  conventional white level and are refused with an error naming the file and mode. Other modes
  (palette, grey, RGBA, CMYK...) go through PIL's `convert("RGB")`.
  """
  from PIL import Image, ImageOps, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    with Image.open(path) as img:
      img = ImageOps.exif_transpose(img)
      if img.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(img).astype(np.uint32) + 128) // 257
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
      if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "float"
        raise ValueError(
            f"cannot read image {path}: mode {img.mode} ({kind} pixels) has no standard white "
            "level; convert it to 8-bit RGB yourself and pass the array to predict")
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
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"the image is empty: shape {image.shape}")
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"expected a uint8 or float image, got dtype {image.dtype}")
  if not np.all(np.isfinite(image)):
    raise ValueError(f"the image holds {np.count_nonzero(~np.isfinite(image))} NaN or infinite "
                     "values; a float image must hold values in [0, 1]")
  if image.min() < 0 or image.max() > 1:
    raise ValueError(f"a float image must hold values in [0, 1], got [{image.min()}, {image.max()}]")
  return image.astype(np.float32)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes a valid RGB image [H, W, 3] (uint8, or float in [0, 1]) to float32 0..1 [*size, 3]
  exactly as the evaluation pipeline resizes its images (data_pipelines.transforms.resize).

  That is PIL bicubic on 8-bit pixels: PIL widens the kernel by the shrink factor, so a photo
  much larger than the model's input is low-pass filtered rather than aliased. A float image is
  first rounded to 8 bits: the network only ever saw 8-bit pixels, and it keeps a uint8 image
  and the same image as floats (uint8 / 255) the same input.
  """
  from data_pipelines import transforms  # pylint: disable=g-import-not-at-top

  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.round(image.astype(np.float32) * 255.0).astype(np.uint8)
  resized = transforms.resize({"image": image}, size, keys=("image",))["image"]
  return resized.astype(np.float32) / 255.0


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

  @property
  def eval_resize(self) -> str:
    """How predictions are brought back to the image's size: the config's eval_resize (configs
    written before the option existed evaluated in the "survey" order, its default)."""
    return eval_resizing.check_order(self.config.get("eval_resize", "survey"))

  def network_input(self, image: np.ndarray) -> np.ndarray:
    """The normalised batch the network sees for one RGB image [H, W, 3] (uint8 or float in
    [0, 1]): float32 [1, h, w, 3] at the model's input size, resized as the evaluation pipeline
    resizes its images (`resize_image`)."""
    check_rgb(image)
    return normalize(resize_image(image, self.input_size)).astype(np.float32)[None]

  def _network_logits(self, image: np.ndarray) -> dict[str, jax.Array]:
    """Final logits {task: [1, h, w, C_task]} at the model's input size."""
    return self._forward(self.variables, jnp.asarray(self.network_input(image)))

  def predict_logits(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Final logits {task: [H, W, C_task]} float32 at the image's own size.

    image: RGB [H, W, 3], uint8 or float in [0, 1]. It is resized to the model's input size as
    the evaluation pipeline resizes images, and the logits are resized back bilinearly (half-pixel
    centres, no antialiasing), as the evaluation does in its eval_resize="logits" order. `predict`
    follows the config's order instead.
    """
    size = np.asarray(image).shape[:2]
    logits = self._network_logits(image)
    return {t: np.array(eval_resizing.resize_linear_to_canvas(v, jnp.array([size]), size)[0],
                        np.float32)
            for t, v in logits.items()}

  def predict(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions at the image's size [H, W], as the evaluation scores them.

    Returns numpy arrays: segmentation [H, W] int32 class ids, depth [H, W] float32 metres (at
    least `tasks.MIN_DEPTH`, as scored: the raw regression can go below 0 where it was never
    supervised), saliency and edge [H, W] float32 probability, normals [H, W, 3] float32 unit
    vectors. They are brought to the image's size in the config's eval_resize order
    (iterfuse_jax.eval_resizing): with "survey" (the default) class ids are taken at the
    network's size and resized by nearest neighbour, and saliency probabilities resized linearly
    and truncated to multiples of 1/255 (the survey's 8-bit files); with "logits" the logits are
    resized linearly and then decoded. Depth, normals and edge logits are resized linearly in
    both orders.
    """
    size = np.asarray(image).shape[:2]
    logits = self._network_logits(image)
    resized, decoded = eval_resizing.eval_predictions(
        logits, jnp.array([size]), size, self.tasks, self.eval_resize)
    out = {}
    for task in self.tasks:
      values = np.array(resized[task][0])
      kind = task_registry.get_task(task).kind
      if kind == "segmentation":
        out[task] = (values if decoded else values.argmax(-1)).astype(np.int32)
      elif kind == "binary" and decoded:
        out[task] = values[..., 0].astype(np.float32)
      elif kind in ("binary", "boundary"):
        # Through jax: numpy's exp warns of overflow on very negative logits.
        out[task] = np.array(jax.nn.sigmoid(values[..., 0]), np.float32)
      elif kind == "normals":
        norm = np.linalg.norm(values, axis=-1, keepdims=True)
        out[task] = (values / (norm + 1e-12)).astype(np.float32)
      else:  # depth, clamped as the survey's evaluation clamps it
        out[task] = np.maximum(values[..., 0], task_registry.MIN_DEPTH).astype(np.float32)
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

    x = jnp.asarray(self.network_input(image))
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
