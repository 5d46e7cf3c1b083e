"""ImageNet weight conversion: every published file layout -> orbax -> same features as timm;
CLI with the ImageNet top-5 check; insertion into the multi-task network; clear errors."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from iterfuse_jax import convert_imagenet
from iterfuse_jax.models import build_model, hrnet_weights
from iterfuse_jax.models.hrnet import HRNet
from tests.models import timm_hrnet

torch = timm_hrnet.torch
VARIANT = "w18_small_v2"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
  """A random timm HRNet-W18-Small-v2, its numpy state dict and its branches on one image."""
  model = timm_hrnet.random_timm_hrnet(VARIANT, seed=10)
  images = np.random.RandomState(10).randn(1, 64, 64, 3).astype(np.float32)
  return {"model": model, "state": timm_hrnet.numpy_state_dict(model), "images": images,
          "branches": timm_hrnet.timm_branches(model, images)}


@pytest.fixture(scope="module")
def apply_fn():
  return jax.jit(HRNet(VARIANT, "nearest").apply)


def _torch_state(state, prefix=""):
  return {prefix + k: torch.from_numpy(v.copy()) for k, v in state.items()}


def _write(tmp_path, layout, state):
  """Saves `state` the way one of the published checkpoints is laid out; returns the path."""
  if layout == "plain.pth":  # HRNet-Image-Classification, timm
    obj = _torch_state(state)
  elif layout == "state_dict_wrapper.pth":  # mmcv/openmmlab style container
    obj = {"state_dict": _torch_state(state), "meta": {"epoch": 100}}
  elif layout == "model_backbone_prefix.pth":  # mmpretrain-like: backbone.* inside "model"
    obj = {"model": _torch_state(state, "backbone."), "optimizer": {}}
  elif layout == "dataparallel.pth":
    obj = _torch_state(state, "module.")
  elif layout == "weights.safetensors":
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    path = tmp_path / layout
    st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path
  else:
    raise AssertionError(layout)
  path = tmp_path / layout
  torch.save(obj, path)
  return path


@pytest.mark.parametrize("layout", ["plain.pth", "state_dict_wrapper.pth",
                                    "model_backbone_prefix.pth", "dataparallel.pth",
                                    "weights.safetensors"])
def test_layout_converts_to_same_features(tmp_path, reference, apply_fn, layout):
  src = _write(tmp_path, layout, reference["state"])
  summary = convert_imagenet.convert_file(str(src), str(tmp_path / "out"), VARIANT)
  assert summary["variant"] == VARIANT
  backbone_keys = [k for k in reference["state"] if not k.endswith("num_batches_tracked")
                   and not hrnet_weights.is_classifier_key(k)]
  assert summary["num_backbone_tensors"] == len(backbone_keys)
  assert summary["num_classifier_tensors_dropped"] > 0
  variables = convert_imagenet.load_backbone_variables(str(tmp_path / "out"), VARIANT)
  direct = hrnet_weights.torch_state_dict_to_flax(reference["state"], VARIANT)
  flat, flat_direct = (traverse_util.flatten_dict(v) for v in (variables, direct))
  assert flat.keys() == flat_direct.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(value, flat_direct[key], err_msg=str(key))
  outputs = apply_fn(variables, reference["images"])
  for out, ref in zip(outputs, reference["branches"]):
    assert timm_hrnet.relative_error(out, ref) < TOL


def test_cli_converts_and_checks_imagenet_top5(tmp_path, reference, capsys):
  src = _write(tmp_path, "plain.pth", reference["state"])
  image_path = tmp_path / "image.png"
  pixels = np.random.RandomState(11).randint(0, 256, (150, 200, 3)).astype(np.uint8)
  Image.fromarray(pixels).save(image_path)
  dst = tmp_path / "converted"
  assert convert_imagenet.main(["--src", str(src), "--dst", str(dst), "--variant", VARIANT,
                                "--check", str(image_path)]) == 0
  printed = capsys.readouterr().out
  assert "converted" in printed and "top-5" in printed
  meta = json.loads((dst / "meta.json").read_text())
  assert meta["variant"] == VARIANT and meta["format"] == convert_imagenet.FORMAT
  # The printed top-5 is timm's top-5 on the same preprocessed image.
  images = convert_imagenet.preprocess_image(str(image_path))
  assert images.shape == (1, 224, 224, 3)
  expected = np.argsort(-timm_hrnet.timm_logits(reference["model"], images)[0])[:5]
  printed_classes = [int(line.split()[1]) for line in printed.splitlines()
                     if line.strip().startswith("class")]
  assert printed_classes == [int(c) for c in expected]


def test_insert_backbone_into_multitask_network(tmp_path, reference):
  config = ml_collections.ConfigDict({
      "dataset": {"name": "nyud", "tasks": ("semseg", "depth")},
      "model": {"name": "mtl", "backbone": VARIANT, "fuse_upsample": "bilinear",
                "task_channels": 16, "initial_blocks": 1, "dtype": "float32",
                "tpim": {"use_ifb": True, "variant": "C", "n_iter": 1, "alpha_init": 0.3,
                         "scale": 2, "qk_channels": 0, "ifb_impl": "materialized"}},
  })
  model = build_model(config)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  backbone = hrnet_weights.torch_state_dict_to_flax(reference["state"], VARIANT)
  merged = convert_imagenet.insert_backbone(dict(abstract), backbone)
  for collection in ("params", "batch_stats"):
    got = traverse_util.flatten_dict(merged[collection]["backbone"])
    want = traverse_util.flatten_dict(backbone[collection])
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
      assert got[key].dtype == jnp.float32
    # Everything outside the backbone is left as it was.
    others = [k for k in abstract[collection] if k != "backbone"]
    assert others and all(merged[collection][k] is abstract[collection][k] for k in others)
  assert abstract["params"]["backbone"] is not merged["params"]["backbone"]

  # A backbone of the wrong variant, or one wrongly shaped tensor: named errors.
  wrong = hrnet_weights.abstract_variables("w18")
  with pytest.raises(ValueError, match=r"layer1_block2.*not in the model"):
    convert_imagenet.insert_backbone(dict(abstract), wrong)
  bad = jax.tree.map(np.asarray, backbone)
  bad["params"]["conv1"]["kernel"] = np.zeros((3, 3, 3, 32), np.float32)
  with pytest.raises(ValueError, match=r"params/backbone/conv1/kernel: model shape \(3, 3, 3, 64\)"):
    convert_imagenet.insert_backbone(dict(abstract), bad)
  with pytest.raises(ValueError, match=r"no sub-tree 'encoder'"):
    convert_imagenet.insert_backbone(dict(abstract), backbone, path=("encoder",))


def test_cli_reports_errors_without_traceback(tmp_path, reference, capsys):
  src = _write(tmp_path, "weights.safetensors", reference["state"])
  assert convert_imagenet.main(["--src", str(src), "--dst", str(tmp_path / "out"),
                                "--variant", "w18"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: cannot convert this state dict to HRNet variant 'w18'")
  assert "Traceback" not in err
  assert not (tmp_path / "out").exists()


def test_load_rejects_wrong_variant_and_non_checkpoint(tmp_path, reference):
  src = _write(tmp_path, "weights.safetensors", reference["state"])
  convert_imagenet.convert_file(str(src), str(tmp_path / "out"), VARIANT)
  via_orbax_dir = convert_imagenet.load_backbone_variables(str(tmp_path / "out" / "variables"),
                                                          VARIANT)
  np.testing.assert_array_equal(via_orbax_dir["params"]["conv1"]["kernel"],
                                reference["state"]["conv1.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match=r"'w18_small_v2'.*'w18'"):
    convert_imagenet.load_backbone_variables(str(tmp_path / "out"), "w18")
  with pytest.raises(FileNotFoundError, match="meta.json"):
    convert_imagenet.load_backbone_variables(str(tmp_path), VARIANT)
  with pytest.raises(ValueError, match="already exists"):
    convert_imagenet.convert_file(str(src), str(tmp_path / "out"), VARIANT)


@pytest.mark.parametrize("layout", ["plain.pth", "weights.safetensors"])
def test_truncated_file(tmp_path, reference, layout):
  src = _write(tmp_path, layout, reference["state"])
  data = src.read_bytes()
  src.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"truncated"):
    convert_imagenet.convert_file(str(src), str(tmp_path / "out"), VARIANT)
  assert not (tmp_path / "out").exists()


def test_wrong_variant_is_named(reference):
  with pytest.raises(ValueError, match=r"layout is that of variant 'w18_small_v2', not 'w18'"):
    hrnet_weights.torch_state_dict_to_flax(reference["state"], "w18")
  full = timm_hrnet.random_timm_hrnet("w18", seed=12)
  assert hrnet_weights.guess_variant(timm_hrnet.numpy_state_dict(full)) == "w18"
  with pytest.raises(ValueError, match=r"layout is that of variant 'w18', not 'w18_small_v2'"):
    hrnet_weights.torch_state_dict_to_flax(timm_hrnet.numpy_state_dict(full), VARIANT)
  with pytest.raises(ValueError, match=r"unknown HRNet variant 'w32'"):
    hrnet_weights.torch_state_dict_to_flax(reference["state"], "w32")


def test_the_unpublished_tiny_variant_is_not_converted(tmp_path):
  with pytest.raises(ValueError, match=r"'w18_tiny' has no published ImageNet checkpoint; expected "
                     r"one of \['w18', 'w18_small_v2'\]"):
    convert_imagenet.convert_file(str(tmp_path / "missing.pth"), str(tmp_path / "out"), "w18_tiny")
  assert not (tmp_path / "out").exists()


def test_non_hrnet_state_dict(tmp_path):
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
  path = tmp_path / "resnet_like.pth"
  torch.save({"state_dict": net.state_dict()}, path)
  with pytest.raises(ValueError, match=r"does not look like an HRNet.*0\.weight"):
    convert_imagenet.convert_file(str(path), str(tmp_path / "out"), VARIANT)
  torch.save([1, 2, 3], tmp_path / "list.pth")
  with pytest.raises(ValueError, match=r"expected a state dict.*list"):
    convert_imagenet.read_state_dict(tmp_path / "list.pth")
  with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
    convert_imagenet.read_state_dict(tmp_path / "missing.pth")


def test_every_problem_is_listed(reference):
  state = dict(reference["state"])
  state["stage3.1.fuse_layers.2.0.1.1.weight"] = np.ones(5, np.float32)  # wrong shape
  del state["transition2.2.0.1.running_var"]  # missing
  state["stage2.0.extra.weight"] = np.ones(3, np.float32)  # no home
  with pytest.raises(ValueError) as info:
    hrnet_weights.torch_state_dict_to_flax(state, VARIANT)
  message = str(info.value)
  assert "tensors with no place in the model (1):\n  stage2.0.extra.weight" in message
  assert "model variables with no tensor (1):\n  transition2.2.0.1.running_var" in message
  assert ("shape mismatches (1):\n  stage3.1.fuse_layers.2.0.1.1.weight: expected (72,), "
          "got (5,)") in message
  # The classifier head is not silently accepted when it is asked for and missing.
  backbone_only = {k: v for k, v in reference["state"].items()
                   if not hrnet_weights.is_classifier_key(k)}
  with pytest.raises(ValueError) as info:
    hrnet_weights.torch_state_dict_to_flax(backbone_only, VARIANT, include_classifier=True)
  message = str(info.value)
  assert "model variables with no tensor (106):\n  classifier.bias (expected shape (1000,)" in message
  assert "... and 46 more" in message  # long lists are cut, with the count of the rest


def test_missing_torch_gives_clear_error(tmp_path, monkeypatch):
  path = tmp_path / "weights.pth"
  path.write_bytes(b"not really a checkpoint")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=r"needs torch"):
    convert_imagenet.read_state_dict(path)


def test_training_starts_from_the_converted_backbone(tmp_path, reference):
  """config.model.pretrained = a converted folder: the train state's backbone is exactly it."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from iterfuse_jax import train  # pylint: disable=g-import-not-at-top

  src = _write(tmp_path, "plain.pth", reference["state"])
  convert_imagenet.convert_file(str(src), str(tmp_path / "hrnet18"), VARIANT)
  config = ml_collections.ConfigDict(demo.get_config().to_dict())
  config.model.task_channels, config.model.tpim.n_iter = 8, 1
  config.model.pretrained = str(tmp_path / "hrnet18")
  model = build_model(config)
  tx = train.create_optimizer(config, lambda step: 1e-3)
  state = train.create_train_state(config, model, tx, jax.random.key(0), (1, 64, 64, 3),
                                   train.create_mesh(1))
  want = hrnet_weights.torch_state_dict_to_flax(reference["state"], VARIANT)
  for collection, tree in (("params", state.params), ("batch_stats", state.batch_stats)):
    got = traverse_util.flatten_dict(jax.device_get(tree["backbone"]))
    expected = traverse_util.flatten_dict(want[collection])
    assert got.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"{collection}/{key}")
  # Adam's moments start at zero for the loaded weights.
  mu = [s.mu for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
        if hasattr(s, "mu")]
  assert mu and all(not np.any(np.asarray(x)) for x in jax.tree.leaves(mu))

  # A folder of another variant is refused before anything is traced or compiled.
  class NotToBeInitialised:
    def init(self, *args, **kwargs):
      raise AssertionError("the model was initialised before the backbone folder was checked")

  config.model.backbone = "w18"
  with pytest.raises(ValueError, match=r"'w18_small_v2'.*'w18'"):
    train.create_train_state(config, NotToBeInitialised(), tx, jax.random.key(0),
                             (1, 64, 64, 3), train.create_mesh(1))


EXPERIMENT_CONFIGS = sorted(
    p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*_*.py")
    if p.stem not in ("demo_rows", "full_tasks", "__init__"))  # helpers, not experiments


@pytest.fixture(scope="module")
def converted(tmp_path_factory, reference):
  folder = tmp_path_factory.mktemp("converted")
  src = _write(folder, "plain.pth", reference["state"])
  convert_imagenet.convert_file(str(src), str(folder / "hrnet18"), VARIANT)
  return str(folder / "hrnet18"), hrnet_weights.torch_state_dict_to_flax(reference["state"],
                                                                          VARIANT)


def _assert_backbone_equals(tree, path, expected, collection):
  got = traverse_util.flatten_dict(jax.device_get(convert_imagenet._subtree(tree, path, "")))
  want = traverse_util.flatten_dict(expected[collection])
  assert got.keys() == want.keys(), path
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=f"{path}/{key}")


@pytest.mark.parametrize("name", EXPERIMENT_CONFIGS)
def test_every_experiment_config_takes_the_converted_backbone_everywhere(name, converted):
  """Every backbone of every experiment's network (one per task for STL) gets the weights."""
  import importlib  # pylint: disable=g-import-not-at-top

  folder, expected = converted
  config = importlib.import_module(f"configs.{name}").get_config()
  abstract = jax.eval_shape(lambda x: build_model(config).init(jax.random.key(0), x),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  backbone = convert_imagenet.load_backbone_variables(folder, config.model.backbone)
  merged, paths = convert_imagenet.insert_backbones(dict(abstract), backbone)
  tasks = tuple(config.dataset.tasks)
  if config.model.name == "stl":
    assert paths == [(f"networks_{t}", "backbone") for t in sorted(tasks)]
  else:
    assert paths == [("backbone",)]
  for path in paths:
    for collection in ("params", "batch_stats"):
      _assert_backbone_equals(merged[collection], path, expected, collection)


def test_stl_training_starts_from_the_converted_backbone_in_every_network(converted):
  """The real train state of the STL row: each task's backbone is the converted one, the heads
  keep their initialisation, Adam's moments start at zero."""
  from configs import nyud_stl  # pylint: disable=g-import-not-at-top
  from iterfuse_jax import train  # pylint: disable=g-import-not-at-top

  folder, expected = converted
  config = ml_collections.ConfigDict(nyud_stl.get_config().to_dict())
  config.model.pretrained = folder
  tx = train.create_optimizer(config, lambda step: 1e-3)
  state = train.create_train_state(config, build_model(config), tx, jax.random.key(0),
                                   (1, 64, 64, 3), train.create_mesh(1))
  for task in config.dataset.tasks:
    _assert_backbone_equals(state.params, (f"networks_{task}", "backbone"), expected, "params")
    _assert_backbone_equals(state.batch_stats, (f"networks_{task}", "backbone"), expected,
                            "batch_stats")
  mu = [s.mu for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
        if hasattr(s, "mu")]
  assert mu and all(not np.any(np.asarray(x)) for x in jax.tree.leaves(mu))


def test_a_network_without_backbone_is_a_named_error():
  with pytest.raises(ValueError, match="no sub-tree called 'backbone'.*head"):
    convert_imagenet.insert_backbones({"params": {"head": {"kernel": np.zeros(2)}},
                                       "batch_stats": {}}, {"params": {}, "batch_stats": {}})
