"""The notebook API: load a workdir, predict at any size, inspect CIB attention, clear errors."""

import jax
import jax.numpy as jnp
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


class _FakeModel:
  """Stands in for a network: `fn` maps the input batch [1, h, w, 3] to {task: logits}."""

  def __init__(self, fn):
    self.fn = fn

  def apply(self, variables, x, train):
    del variables, train
    return {"final": self.fn(x)}


def _fake_predictor(tasks, fn, dataset="pascal", size=(8, 8), eval_resize=None):
  config = ml_collections.ConfigDict({
      "dataset": {"name": dataset, "tasks": list(tasks), "eval_size": list(size)}})
  if eval_resize is not None:
    config.eval_resize = eval_resize
  return inference.Predictor(config=config, model=_FakeModel(fn), variables={})


def _checkerboard_logits(x):
  """Fixed logits at the input size: semseg classes 0/1 in a checkerboard, sal and edge ramps."""
  rows, cols = np.indices(x.shape[1:3])
  board = ((rows + cols) % 2).astype(np.float32)
  ramp = np.linspace(-4, 4, board.size, dtype=np.float32).reshape(board.shape)
  return {"semseg": jnp.asarray(np.stack([board, 1 - board], -1)[None]),
          "sal": jnp.asarray(ramp[None, ..., None]),
          "edge": jnp.asarray(-ramp[None, ..., None])}


def test_read_image_applies_the_exif_orientation(tmp_path):
  from PIL import Image

  landscape = np.zeros((6, 8, 3), np.uint8)
  landscape[:, :2] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write portrait shots
  path = tmp_path / "portrait.png"
  Image.fromarray(landscape).save(path, exif=exif.tobytes())
  np.testing.assert_array_equal(inference.read_image(path), np.rot90(landscape, k=-1))


def test_read_image_scales_16_bit_and_refuses_32_bit(tmp_path):
  from PIL import Image

  values = np.array([[0, 257, 257 * 128, 257 * 128 + 100, 65535]], np.uint16)
  path = tmp_path / "grey16.png"
  Image.fromarray(values).save(path)
  image = inference.read_image(path)
  assert image.shape == (1, 5, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[..., 0], [[0, 1, 128, 128, 255]])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  path = tmp_path / "float.tif"
  Image.fromarray(np.full((2, 3), 0.5, np.float32)).save(path)
  with pytest.raises(ValueError, match=r"float\.tif: mode F"):
    inference.read_image(path)


def test_predict_returns_writable_numpy_arrays():
  predictor = _fake_predictor(("semseg", "sal", "edge"), _checkerboard_logits)
  out = predictor.predict(np.zeros((12, 10, 3), np.uint8))
  for task, value in out.items():
    assert type(value) is np.ndarray and value.shape == (12, 10), task
    value[0, 0] = 0
  assert out["sal"].dtype == out["edge"].dtype == np.float32


def test_predict_follows_the_configs_eval_resize():
  image = np.zeros((20, 12, 3), np.uint8)
  logits = {t: np.asarray(v[0]) for t, v in _checkerboard_logits(np.zeros((1, 8, 8, 3))).items()}
  # The default ("survey", configs without the key): class ids at the network's size, then
  # OpenCV's nearest neighbour; saliency probabilities resized linearly and truncated to 8 bits.
  survey = _fake_predictor(("semseg", "sal", "edge"), _checkerboard_logits).predict(image)
  rows, cols = np.arange(20) * 8 // 20, np.arange(12) * 8 // 12
  np.testing.assert_array_equal(survey["semseg"],
                                logits["semseg"].argmax(-1)[rows[:, None], cols[None, :]])
  levels = np.asarray(jax.image.resize(255 * jax.nn.sigmoid(logits["sal"]), (20, 12, 1),
                                       "linear", antialias=False))[..., 0]
  np.testing.assert_allclose(survey["sal"], np.floor(levels) / 255, atol=1e-6)
  # "logits": resize the logits, then decode.
  predictor = _fake_predictor(("semseg", "sal", "edge"), _checkerboard_logits, eval_resize="logits")
  out, resized = predictor.predict(image), predictor.predict_logits(image)
  np.testing.assert_array_equal(out["semseg"], resized["semseg"].argmax(-1))
  np.testing.assert_allclose(out["sal"], jax.nn.sigmoid(resized["sal"][..., 0]), rtol=1e-6)
  assert np.mean(out["semseg"] != survey["semseg"]) > 0.1
  # Edge logits are resized linearly in either order.
  np.testing.assert_allclose(out["edge"], survey["edge"], rtol=1e-6)


def test_network_input_is_the_eval_pipelines(predictor):
  from data_pipelines import transforms

  # Three times the input size, full of detail that an unfiltered shrink would alias.
  rows, cols = np.indices((3 * SIZE[0], 3 * SIZE[1] + 10))
  big = np.stack([(rows * 37 + cols * 11) % 256, (rows * cols) % 256, (cols * 53) % 256],
                 -1).astype(np.uint8)
  expected = transforms.EvalTransform((), SIZE, SIZE).map({"image": big, "image_id": b"x"})["image"]
  got = predictor.network_input(big)
  assert got.shape == (1, *SIZE, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got[0], expected, atol=1e-5)
  np.testing.assert_array_equal(predictor.network_input(big / 255.0), got)
  # predict feeds exactly that input to the network: a network that passes its input through
  # (shifted to positive depths, which predict returns as they are).
  echo = _fake_predictor(("depth",), lambda x: {"depth": x[..., :1] + 5.0}, dataset="nyud",
                         size=SIZE)
  np.testing.assert_allclose(
      echo.predict(big)["depth"],
      jax.image.resize(expected[..., 0] + 5.0, big.shape[:2], "linear", antialias=False),
      atol=1e-5)


def test_predicted_depth_is_clamped_and_scores_as_the_evaluation_scores_it():
  """The raw regression goes below 0 where nothing supervised it (the demo's windows: down to
  -0.54 m); predict returns what the evaluation scores, depth clamped to tasks.MIN_DEPTH."""
  from iterfuse_jax import metrics, tasks

  def ramp(x):
    cols = np.indices(x.shape[1:3])[1]
    return {"depth": jnp.asarray((cols - 3.5).astype(np.float32)[None, ..., None])}

  depth = _fake_predictor(("depth",), ramp, dataset="nyud").predict(np.zeros((8, 8, 3)))["depth"]
  np.testing.assert_array_equal(depth[0],
                                np.float32([tasks.MIN_DEPTH] * 4 + [0.5, 1.5, 2.5, 3.5]))
  label = np.full((1, 8, 8), 2.0, np.float32)
  raw = metrics.DepthErrors.from_model_output(
      {"depth": ramp(np.zeros((1, 8, 8, 3)))["depth"]}, {"depth": label}).compute()
  scored = metrics.DepthErrors.from_model_output(
      {"depth": depth[None, ..., None]}, {"depth": label}).compute()
  assert raw.keys() == scored.keys() and raw["rmse"] > 0
  for key in raw:
    np.testing.assert_allclose(scored[key], raw[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("image", [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0, 3), np.float32)])
def test_empty_images_are_refused(predictor, image):
  with pytest.raises(ValueError, match="empty"):
    predictor.predict(image)
  with pytest.raises(ValueError, match="empty"):
    predictor.attention(image, source="depth", target="semseg", pixel=(0, 0))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_images_are_refused(predictor, bad):
  image = np.full((8, 8, 3), 0.5, np.float32)
  image[3, 4, 1] = bad
  with pytest.raises(ValueError, match="NaN or infinite"):
    predictor.predict(image)
