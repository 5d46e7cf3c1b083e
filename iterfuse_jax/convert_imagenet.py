"""Converts ImageNet-trained PyTorch HRNet weights into an orbax checkpoint of the Flax backbone.

Usage::

  python -m iterfuse_jax.convert_imagenet --src hrnet_w18_small_model_v2.pth --dst weights/w18s \
      [--variant w18_small_v2|w18] [--check IMAGE]

Reads a PyTorch pickle (.pth/.pt/.bin; needs torch) or a .safetensors file, unwraps
{"state_dict": ...} / {"model": ...} containers and `module.` / `backbone.` prefixes, and writes

  DST/variables/   orbax checkpoint of {"params": ..., "batch_stats": ...} of `HRNet(variant)`
  DST/meta.json    {"format", "variant", "source", ...}

`--check IMAGE` also runs the full ImageNet classifier (when the file has it) on the image and
prints the top-5 class indices, a quick sanity check of a real checkpoint.

The trainer uses `load_backbone_variables` and `insert_backbones` (every backbone of a
network: one for the multi-task models, one per task for STL).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from iterfuse_jax.models import hrnet_weights
from iterfuse_jax.models.hrnet import PUBLISHED_VARIANTS, HRNetClassifier, hrnet_spec

FORMAT = "iterfuse_jax.hrnet_backbone/v1"
META_FILE = "meta.json"
VARIABLES_DIR = "variables"
# Containers that training codebases wrap state dicts in, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

Variables = dict[str, Any]


def _to_numpy(value: Any, key: str, src: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # a torch.Tensor
    tensor = value.detach().cpu()
    if tensor.is_floating_point():
      tensor = tensor.float()  # numpy has no bfloat16
    return tensor.numpy()
  raise ValueError(f"{src}: entry {key!r} is a {type(value).__name__}, not a tensor")


def _unwrap(obj: Any, src: str) -> Mapping[str, Any]:
  """Finds the state dict inside a checkpoint object (possibly nested wrappers)."""
  for _ in range(3):
    if not isinstance(obj, Mapping):
      raise ValueError(f"{src}: expected a state dict (a mapping of tensors), got "
                       f"{type(obj).__name__}")
    inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      return obj
    obj = inner
  return obj


def _load_torch(path: pathlib.Path) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading the PyTorch file {path} needs torch (pip install torch, see "
        "requirements-dev.txt); or convert it to .safetensors elsewhere") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read PyTorch checkpoint {path} (truncated or not a torch file?): "
                     f"{type(e).__name__}: {e}") from e


def read_state_dict(src: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a .pth / .safetensors file into {name: numpy array} (wrappers removed, prefixes kept).

  Raises:
    FileNotFoundError: `src` does not exist.
    ValueError: the file cannot be parsed (e.g. truncated) or holds no mapping of tensors.
  """
  path = pathlib.Path(src)
  if not path.is_file():
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  if path.suffix == ".safetensors":
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    try:
      return dict(st_numpy.load_file(str(path)))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): "
                       f"{type(e).__name__}: {e}") from e
  state = _unwrap(_load_torch(path), str(path))
  return {k: _to_numpy(v, k, str(path)) for k, v in state.items()}


def _num_params(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _check_published(variant: str) -> None:
  """A ValueError for an unknown variant or one without ImageNet checkpoints to convert."""
  hrnet_spec(variant)
  if variant not in PUBLISHED_VARIANTS:
    raise ValueError(f"HRNet variant {variant!r} has no published ImageNet checkpoint; expected "
                     f"one of {sorted(PUBLISHED_VARIANTS)}")


def convert_file(src: str, dst: str, variant: str = "w18_small_v2") -> dict[str, Any]:
  """Converts `src` into `dst` (orbax `variables/` + `meta.json`); returns a summary.

  Raises:
    ValueError: unreadable file, not an HRNet state dict, wrong variant, or any tensor that
      does not fit (all listed); `dst/variables` already existing.
  """
  _check_published(variant)
  tensors = hrnet_weights.normalize_state_dict(read_state_dict(src))
  variables = hrnet_weights.torch_state_dict_to_flax(tensors, variant)
  dropped = sorted(k for k in tensors if hrnet_weights.is_classifier_key(k))

  out_dir = pathlib.Path(dst).absolute()
  target = out_dir / VARIABLES_DIR
  if target.exists():
    raise ValueError(f"{target} already exists; choose another --dst or remove it")
  out_dir.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
  summary = {
      "format": FORMAT,
      "variant": variant,
      "source": str(pathlib.Path(src).absolute()),
      "dst": str(out_dir),
      "num_tensors_read": len(tensors),
      "num_backbone_tensors": len(tensors) - len(dropped),
      "num_classifier_tensors_dropped": len(dropped),
      "num_params": _num_params(variables["params"]),
      "num_batch_stats": _num_params(variables["batch_stats"]),
  }
  (out_dir / META_FILE).write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def load_backbone_variables(path: str, variant: str) -> Variables:
  """Reads a directory written by `convert_file`: {"params": ..., "batch_stats": ...} (numpy).

  `path` is the `--dst` directory (or its `variables/` folder).

  Raises:
    FileNotFoundError: `path` is not a converted backbone directory.
    ValueError: it holds another variant (both named) or tensors of the wrong shape.
  """
  hrnet_spec(variant)
  root = pathlib.Path(path).absolute()
  if root.name == VARIABLES_DIR and (root.parent / META_FILE).is_file():
    root = root.parent  # the orbax folder itself was given
  meta_file = root / META_FILE
  if not meta_file.is_file():
    raise FileNotFoundError(f"{root} is not a converted HRNet backbone: {META_FILE} missing "
                            "(make one with python -m iterfuse_jax.convert_imagenet)")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
  if meta.get("variant") != variant:
    raise ValueError(f"{root} holds HRNet variant {meta.get('variant')!r}, but variant "
                     f"{variant!r} was requested")
  abstract = hrnet_weights.abstract_variables(variant)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      restored = checkpointer.restore(root / VARIABLES_DIR, abstract)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot restore the HRNet-{variant} backbone from "
                       f"{root / VARIABLES_DIR}: {type(e).__name__}: {e}") from e
  return {c: jax.tree.map(np.asarray, restored[c]) for c in hrnet_weights.COLLECTIONS}


def _subtree(tree: Mapping[str, Any], path: Sequence[str], what: str) -> Mapping[str, Any]:
  for i, name in enumerate(path):
    if not isinstance(tree, Mapping) or name not in tree:
      raise ValueError(f"{what} has no sub-tree {'/'.join(path[:i + 1])!r}")
    tree = tree[name]
  return tree


def _replace_subtree(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict:
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _replace_subtree(tree[path[0]], path[1:], value)
  return out


def insert_backbone(variables: dict, backbone_vars: dict,
                    path: tuple[str, ...] = ("backbone",)) -> dict:
  """Returns `variables` with the sub-tree at `path` of params/batch_stats replaced.

  Each replacing leaf takes the dtype of the leaf it replaces (the model's float32 by default).
  `variables` itself is not modified.

  Raises:
    ValueError: naming every tensor missing on either side or of a different shape.
  """
  if not path:
    raise ValueError("insert_backbone needs a non-empty path")
  out = dict(variables)
  problems = []
  for collection in hrnet_weights.COLLECTIONS:
    if collection not in backbone_vars:
      raise ValueError(f"backbone variables have no {collection!r} collection")
    if collection not in variables:
      raise ValueError(f"model variables have no {collection!r} collection")
    current = traverse_util.flatten_dict(
        _subtree(variables[collection], path, f"model variables[{collection!r}]"))
    new = traverse_util.flatten_dict(backbone_vars[collection])
    where = f"{collection}/{'/'.join(path)}"
    for key in sorted(set(current) - set(new)):
      problems.append(f"{where}/{'/'.join(key)}: in the model, not in the backbone weights")
    for key in sorted(set(new) - set(current)):
      problems.append(f"{where}/{'/'.join(key)}: in the backbone weights, not in the model")
    for key in sorted(set(new) & set(current)):
      want, got = np.shape(current[key]), np.shape(new[key])
      if want != got:
        problems.append(f"{where}/{'/'.join(key)}: model shape {want}, weights shape {got}")
    if not problems:
      merged = {key: jax.numpy.asarray(value, dtype=current[key].dtype)
                for key, value in new.items()}
      out[collection] = _replace_subtree(variables[collection], path,
                                         traverse_util.unflatten_dict(merged))
  if problems:
    raise ValueError("backbone weights do not fit the model:\n  " + "\n  ".join(problems))
  return out


def backbone_paths(params: Mapping[str, Any], name: str = "backbone") -> list[tuple[str, ...]]:
  """Paths of every sub-tree called `name` in a params tree, in sorted order.

  The multi-task networks have one ("backbone",); the STL network one per task
  (("networks_semseg", "backbone"), ...). A backbone inside a backbone is not searched.
  """
  found = []

  def visit(node, path):
    for key in sorted(node):
      value = node[key]
      if not isinstance(value, Mapping):
        continue
      if key == name:
        found.append(path + (key,))
      else:
        visit(value, path + (key,))

  visit(params, ())
  return found


def insert_backbones(variables: dict, backbone_vars: dict) -> tuple[dict, list[tuple[str, ...]]]:
  """`insert_backbone` into every backbone of the network; returns (variables, their paths).

  Raises:
    ValueError: the network has no sub-tree called "backbone", or a backbone does not fit.
  """
  paths = backbone_paths(variables.get("params", {}))
  if not paths:
    raise ValueError("the model's params have no sub-tree called 'backbone' to load ImageNet "
                     f"weights into (top-level modules: {sorted(variables.get('params', {}))})")
  for path in paths:
    variables = insert_backbone(variables, backbone_vars, path)
  return variables, paths


def preprocess_image(image_path: str, size: int = 224) -> np.ndarray:
  """ImageNet evaluation preprocessing: shorter side to size/0.875, centre crop, normalise.

  Returns [1, size, size, 3] float32.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(image_path) as image:
    image = image.convert("RGB")
    short = round(size / 0.875)
    scale = short / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
  pixels = np.asarray(image, np.float32) / 255.0
  return ((pixels - IMAGENET_MEAN) / IMAGENET_STD)[None]


def classify(tensors: Mapping[str, np.ndarray], variant: str, images: np.ndarray,
             k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """Top-k (class indices, probabilities) of the full ImageNet classifier, [B, k] each."""
  variables = hrnet_weights.torch_state_dict_to_flax(tensors, variant, include_classifier=True)
  logits = jax.jit(HRNetClassifier(variant, fuse_upsample="nearest").apply)(variables, images)
  logits = np.asarray(logits)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  # Rank by logits: saturated probabilities tie at 0 or 1.
  top = np.argsort(-logits, axis=-1)[:, :k]
  return top, np.take_along_axis(probs, top, axis=-1)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m iterfuse_jax.convert_imagenet",
      description="Convert ImageNet PyTorch HRNet weights into an orbax Flax checkpoint.")
  parser.add_argument("--src", required=True, help=".pth/.pt/.bin or .safetensors file")
  parser.add_argument("--dst", required=True, help="output directory")
  parser.add_argument("--variant", default="w18_small_v2", choices=sorted(PUBLISHED_VARIANTS))
  parser.add_argument("--check", metavar="IMAGE",
                      help="print the ImageNet top-5 of the full classifier on this image")
  args = parser.parse_args(argv)
  try:
    _run(args)
  except (ValueError, FileNotFoundError, ImportError) as e:
    # The messages name the file and every misfit tensor; a traceback adds nothing.
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _run(args: argparse.Namespace) -> None:
  summary = convert_file(args.src, args.dst, args.variant)
  print(f"converted {summary['num_backbone_tensors']} backbone tensors of {args.src} "
        f"(HRNet {args.variant}: {summary['num_params']:,} parameters, "
        f"{summary['num_batch_stats']:,} BN statistics); dropped "
        f"{summary['num_classifier_tensors_dropped']} classifier-head tensors")
  print(f"wrote {summary['dst']}/{VARIABLES_DIR} and {summary['dst']}/{META_FILE}")
  if args.check:
    tensors = hrnet_weights.normalize_state_dict(read_state_dict(args.src))
    if not any(k.startswith("classifier.") for k in tensors):
      raise ValueError(f"--check needs the ImageNet classifier, which {args.src} does not have")
    top, probs = classify(tensors, args.variant, preprocess_image(args.check))
    print(f"ImageNet top-5 for {args.check}:")
    for index, prob in zip(top[0], probs[0]):
      print(f"  class {int(index):4d}  p={float(prob):.4f}")


if __name__ == "__main__":
  raise SystemExit(main())
