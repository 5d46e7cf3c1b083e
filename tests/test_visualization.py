"""Pictures: shapes, dtypes and the colours of known classes, depth and saliency values."""

import numpy as np
import pytest

from iterfuse_jax import visualization as vis


def test_voc_palette_known_entries():
  palette = vis.voc_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  assert palette[0].tolist() == [0, 0, 0]
  assert palette[1].tolist() == [128, 0, 0]  # aeroplane
  assert palette[15].tolist() == [192, 128, 128]  # person
  assert palette[20].tolist() == [0, 64, 128]  # tvmonitor
  assert len({tuple(c) for c in palette}) == 256


def test_voc_palette_equals_the_datasets_own(shared_data_dir):
  cmap = np.load(shared_data_dir / "pascal_samples" / "cmap.npy")
  np.testing.assert_array_equal(vis.voc_palette(len(cmap)), cmap)


def test_class_names_match_registry_sizes():
  assert len(vis.class_names("semseg", "nyud")) == 40
  assert len(vis.class_names("semseg", "pascal")) == 21
  assert len(vis.class_names("human_parts", "pascal")) == 7
  assert vis.class_names("semseg", "pascal")[15] == "person"
  assert vis.class_names("semseg", "nyud")[0] == "wall"
  with pytest.raises(ValueError):
    vis.class_names("human_parts", "nyud")
  with pytest.raises(ValueError, match="not a segmentation task"):
    vis.class_names("depth", "nyud")


def test_palettes_distinct_and_ignore_colour_unused():
  for name, palette in vis.palettes().items():
    colours = {tuple(c) for c in palette}
    assert len(colours) == len(palette), name
    assert vis.IGNORE_RGB not in colours, name
  assert (0, 0, 0) not in {tuple(c) for c in vis.segmentation_palette("semseg", "nyud")}


def test_colorize_segmentation_colours_and_ignore():
  labels = np.array([[[0, 15], [255, 7]]], np.uint8)  # [1, 2, 2]
  rgb = vis.colorize_segmentation(labels, "semseg", "pascal")
  assert rgb.shape == (1, 2, 2, 3) and rgb.dtype == np.uint8
  assert rgb[0, 0, 0].tolist() == [0, 0, 0]  # background
  assert rgb[0, 0, 1].tolist() == [192, 128, 128]  # person
  assert rgb[0, 1, 0].tolist() == list(vis.IGNORE_RGB)
  assert rgb[0, 1, 1].tolist() == [128, 128, 128]  # car
  nyud = vis.colorize_segmentation(np.array([[0, 39]]), "semseg", "nyud")
  assert nyud.shape == (1, 2, 3)
  assert nyud[0, 0].tolist() == [128, 0, 0]  # wall takes VOC entry 1, not black
  with pytest.raises(ValueError, match=r"\[40\]"):
    vis.colorize_segmentation(np.array([[40]]), "semseg", "nyud")
  with pytest.raises(ValueError, match="integer"):
    vis.colorize_segmentation(np.array([[0.5]]), "semseg", "nyud")


def test_colorize_depth():
  depth = np.array([[[0.0, 1.0, 2.0, 3.0]]], np.float32)
  rgb = vis.colorize_depth(depth, vmin=1.0, vmax=3.0)
  assert rgb.shape == (1, 1, 4, 3) and rgb.dtype == np.uint8
  assert rgb[0, 0, 0].tolist() == [0, 0, 0]  # invalid
  assert rgb[0, 0, 1].tolist() == [253, 231, 37]  # nearest: bright end of the ramp
  assert rgb[0, 0, 3].tolist() == [68, 1, 84]  # farthest: dark end
  assert rgb[0, 0, 2].tolist() == [33, 145, 140]  # middle anchor
  # Brightness falls monotonically with depth.
  ramp = vis.colorize_depth(np.linspace(1, 3, 50)[None], 1.0, 3.0)[0].astype(int).sum(-1)
  assert np.all(np.diff(ramp) <= 0)
  # Automatic range: not constant, invalid still black.
  auto = vis.colorize_depth(np.array([[0.0, 1.0, 5.0]]))
  assert auto[0, 0].tolist() == [0, 0, 0] and auto[0, 1].tolist() != auto[0, 2].tolist()


def test_colorize_saliency():
  rgb = vis.colorize_saliency(np.array([[0.0, 0.5, 1.0, 255.0]]))
  assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
  assert rgb[0, :3, 0].tolist() == [0, 128, 255]
  assert np.all(rgb[0, :3, 0:1] == rgb[0, :3])  # grey
  assert rgb[0, 3].tolist() == list(vis.SALIENCY_IGNORE_RGB)


def test_denormalize_image_round_trip():
  rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3)).astype(np.uint8)
  normalised = (rgb / 255.0 - np.array(vis.IMAGENET_MEAN)) / np.array(vis.IMAGENET_STD)
  out = vis.denormalize_image(normalised.astype(np.float32))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, rgb)
  with pytest.raises(ValueError, match="3"):
    vis.denormalize_image(np.zeros((2, 2, 4)))


def test_task_to_rgb_predictions_and_labels():
  b, h, w = 2, 3, 4
  logits = np.zeros((b, h, w, 21), np.float32)
  logits[..., 15] = 1.0
  seg = vis.task_to_rgb("semseg", "pascal", logits, is_prediction=True)
  assert seg.shape == (b, h, w, 3) and seg.dtype == np.uint8
  assert np.all(seg == np.array([192, 128, 128], np.uint8))
  labels = np.full((b, h, w), 15, np.uint8)
  np.testing.assert_array_equal(vis.task_to_rgb("semseg", "pascal", labels, False), seg)

  parts = vis.task_to_rgb("human_parts", "pascal", np.ones((b, h, w, 7)), True)
  assert parts.shape == (b, h, w, 3)

  sal = vis.task_to_rgb("sal", "pascal", np.zeros((b, h, w, 1)), True)  # sigmoid(0) = 0.5
  assert np.all(sal == 128)
  sal_gt = vis.task_to_rgb("sal", "pascal", np.ones((b, h, w), np.uint8), False)
  assert np.all(sal_gt == 255)

  depth_pred = vis.task_to_rgb("depth", "nyud", np.full((b, h, w, 1), 2.0), True)
  depth_gt = vis.task_to_rgb("depth", "nyud", np.full((b, h, w), 2.0), False)
  assert depth_pred.shape == (b, h, w, 3)
  np.testing.assert_array_equal(depth_pred, depth_gt)  # one fixed range for both

  with pytest.raises(ValueError, match=r"\[B, H, W, 40\]"):
    vis.task_to_rgb("semseg", "nyud", logits, True)
  with pytest.raises(ValueError, match=r"\[B, H, W\]"):
    vis.task_to_rgb("semseg", "pascal", labels[0], False)


def test_normals_and_edges_pictures():
  normals = np.zeros((1, 2, 2, 3), np.float32)
  normals[0, 0, 0] = (0, 0, -1)
  normals[0, 0, 1] = (3, 0, 0)  # a raw prediction: normalised first
  rgb = vis.task_to_rgb("normals", "nyud", normals, is_prediction=False)
  assert rgb.shape == (1, 2, 2, 3) and rgb.dtype == np.uint8
  assert rgb[0, 0, 0].tolist() == [128, 128, 0] and rgb[0, 0, 1].tolist() == [255, 128, 128]
  assert np.all(rgb[0, 1] == 0)  # invalid: black
  np.testing.assert_array_equal(vis.task_to_rgb("normals", "pascal", normals, is_prediction=True),
                                rgb)
  edge = vis.task_to_rgb("edge", "pascal", np.full((1, 2, 2, 1), 50.0), is_prediction=True)
  assert np.all(edge == 255)
  labels = np.array([[[0, 1], [255, 1]]])
  pic = vis.task_to_rgb("edge", "nyud", labels, is_prediction=False)
  assert pic[0, 0, 0].tolist() == [0, 0, 0] and pic[0, 0, 1].tolist() == [255, 255, 255]
  assert pic[0, 1, 0].tolist() == list(vis.SALIENCY_IGNORE_RGB)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    vis.task_to_rgb("normals", "nyud", np.zeros((1, 2, 2)), is_prediction=False)
