"""The notebook API: load a workdir, predict at any size, inspect CIB attention, clear errors."""

import jax
import ml_collections
import numpy as np
import pytest

from iterfuse_jax import inference, models, train
from iterfuse_jax.checkpoints import RunCheckpoints

SIZE = (64, 64)


def _config(task_channels=8):
  return ml_collections.ConfigDict({
      "seed": 0,
      "dataset": {"name": "nyud", "tasks": ["semseg", "depth"], "train_size": list(SIZE),
                  "eval_size": list(SIZE), "data_dir": ""},
      "model": {
          # configs/demo.py:tiny's backbone: the four branches of W18-Small-v2, faster compiles.
          "name": "iterfuse", "backbone": "w18_tiny", "fuse_upsample": "bilinear",
          "task_channels": task_channels, "initial_blocks": 1, "dtype": "float32", "pretrained": "",
          "tpim": {"use_ifb": True, "variant": "C", "n_iter": 3, "alpha_init": 0.3, "scale": 2,
                   "qk_channels": 0, "ifb_impl": "materialized"},
      },
      "num_epochs": 1,
      "optimizer": {"name": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "momentum": 0.9,
                    "poly_power": 0.9},
  })


def _write_workdir(path, config, step=5):
  """A workdir as training leaves it: config.json and an orbax checkpoint of the train state."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(config.to_json())
  model = models.build_model(config)
  tx = train.create_optimizer(config, lambda s: 1e-3)
  state = train.create_train_state(config, model, tx, jax.random.key(1), (1, *SIZE, 3),
                                   train.create_mesh(1))
  # Make the saved weights distinguishable from a fresh init (a shift of every kernel would make
  # the untrained network's activations overflow, so scale them and shift only alpha).
  def perturb(path, x):
    return x + 0.01 if path[-1].key == "alpha" else x * 1.01

  state = state.replace(params=jax.tree_util.tree_map_with_path(perturb, state.params))
  checkpoints = RunCheckpoints(path, keep=2)
  checkpoints.save(step, state, None)
  checkpoints.close()
  return state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("work")
  state = _write_workdir(path, _config())
  return path, state


@pytest.fixture(scope="module")
def predictor(workdir):
  return models.load_predictor(workdir[0])


def test_load_restores_the_saved_weights(workdir, predictor):
  _, state = workdir
  assert predictor.step == 5
  assert predictor.tasks == ("semseg", "depth")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               predictor.variables["params"], state.params)
  alphas = predictor.alphas()
  assert set(alphas) == {"cib_semseg_to_depth", "cib_depth_to_semseg"}
  assert all(a == pytest.approx(0.31) for a in alphas.values())


@pytest.mark.parametrize("shape", [(50, 70, 3), (64, 64, 3)])
def test_predict_returns_the_original_size(predictor, shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  out = predictor.predict(image)
  assert out["semseg"].shape == shape[:2] and out["semseg"].dtype == np.int32
  assert 0 <= out["semseg"].min() and out["semseg"].max() < 40
  assert out["depth"].shape == shape[:2] and out["depth"].dtype == np.float32
  rgb = predictor.colorize(out)
  assert rgb["semseg"].shape == (*shape[:2], 3) and rgb["semseg"].dtype == np.uint8
  # uint8 and the same image as floats in [0, 1] are the same input.
  again = predictor.predict(image.astype(np.float32) / 255)
  np.testing.assert_array_equal(again["semseg"], out["semseg"])


def test_attention_rows_and_ifb_iterates(predictor):
  image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  att = predictor.attention(image, source="depth", target="semseg", pixel=(10, 50))
  gh, gw = att["grid"]
  assert (gh, gw) == (8, 8)  # 64 / 4 (backbone stride) / 2 (sc)
  assert att["grid_pixel"] == (1, 6)
  assert att["affinity"].shape == (gh, gw)
  np.testing.assert_allclose(att["affinity"].sum(), 1.0, rtol=1e-5)
  assert att["ifb_iterates"].shape == att["ifb_row"].shape == (4, gh, gw)
  # Row 0 of the effective operator is the one-hot pixel; C keeps every row a distribution.
  assert att["ifb_row"][0][1, 6] == 1 and att["ifb_row"][0].sum() == 1
  np.testing.assert_allclose(att["ifb_row"].sum(axis=(1, 2)), 1.0, rtol=1e-5)
  # Iteration 1 of variant C: alpha * Co row + (1 - alpha) * one-hot.
  expected = att["alpha"] * att["affinity"]
  expected[1, 6] += 1 - att["alpha"]
  np.testing.assert_allclose(att["ifb_row"][1], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(32, 32, 4), (32, 32), (32, 32, 1)])
def test_images_that_are_not_rgb_are_refused(predictor, shape):
  with pytest.raises(ValueError, match=r"RGB image of shape \[H, W, 3\]"):
    predictor.predict(np.zeros(shape, np.uint8))


def test_bad_attention_requests(predictor):
  image = np.zeros((32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match="sal"):
    predictor.attention(image, source="sal", target="semseg", pixel=(1, 1))
  with pytest.raises(ValueError, match="identity"):
    predictor.attention(image, source="depth", target="depth", pixel=(1, 1))
  with pytest.raises(ValueError, match="outside"):
    predictor.attention(image, source="depth", target="semseg", pixel=(40, 1))


def test_missing_workdir_and_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load_predictor(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load_predictor(tmp_path)


def test_checkpoint_of_another_config_is_refused(workdir, tmp_path):
  path, _ = workdir
  other = _config(task_channels=16)
  with pytest.raises(ValueError, match="does not belong to this config"):
    inference.load_predictor(path, config=other)


def test_read_image_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    inference.read_image(tmp_path / "missing.jpg")
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match="bad.jpg"):
    inference.read_image(bad)
