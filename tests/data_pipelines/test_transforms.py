"""Augmentations: image and labels stay aligned, labels are never interpolated, depth is scaled."""

import numpy as np
import pytest

from data_pipelines import transforms

H, W = 32, 48
# Each class a distinct colour, so that image pixels tell which label they should carry.
PALETTE = np.array([[(37 * c) % 256, (91 * c + 40) % 256, (53 * c + 90) % 256]
                    for c in range(256)], np.uint8)


def blocky_example(seed: int = 0, with_ignore: bool = True) -> dict[str, np.ndarray]:
  """Labels made of 8x8 blocks; image = palette colour of the semseg label; depth per block."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 12, (H // 8, W // 8))
  if with_ignore:
    blocks[1, 2] = blocks[2, 4] = 255
  semseg = np.kron(blocks, np.ones((8, 8), int)).astype(np.uint8)
  depth = np.where(semseg == 255, 0.0, 1.0 + semseg.astype(np.float32) / 4).astype(np.float32)
  parts = ((semseg % 7) * (semseg != 255) + 255 * (semseg == 255)).astype(np.uint8)
  return {"image": PALETTE[semseg], "semseg": semseg, "depth": depth, "human_parts": parts}


def interior(label: np.ndarray, radius: int = 3) -> np.ndarray:
  """Pixels whose neighbourhood holds one label (beyond the reach of the bicubic kernel)."""
  padded = np.pad(label, radius, mode="edge")
  same = np.ones(label.shape, bool)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      same &= padded[dy:dy + label.shape[0], dx:dx + label.shape[1]] == label
  return same


def assert_aligned(example: dict[str, np.ndarray], tolerance: int = 6, radius: int = 3):
  """Interior pixels: the image shows the colour of the semseg label; the labels agree."""
  mask = interior(example["semseg"], radius) & (example["image"].sum(-1) > 0)
  # The image border may be resampled from source pixels just outside the visible window.
  mask[:radius], mask[-radius:], mask[:, :radius], mask[:, -radius:] = False, False, False, False
  assert mask.mean() > 0.05
  diff = np.abs(example["image"].astype(int) - PALETTE[example["semseg"]].astype(int)).max(-1)
  assert np.all(diff[mask] <= tolerance)
  semseg, parts = example["semseg"], example["human_parts"]
  # Both label maps went through the same nearest sampling: still pixel-for-pixel consistent.
  known = semseg != 255
  np.testing.assert_array_equal(parts[known], (semseg % 7)[known])
  np.testing.assert_array_equal(parts[~known], 255)


def test_hflip_mirrors_everything_identically():
  example = blocky_example()
  flipped = transforms.hflip(example)
  for key in example:
    np.testing.assert_array_equal(flipped[key], example[key][:, ::-1])
  assert_aligned(flipped, tolerance=0)


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_centre_zoom_crops_the_centre_nearest_and_divides_depth(scale):
  example = blocky_example()
  zoomed = transforms.centre_zoom(example, scale)
  assert all(zoomed[k].shape == example[k].shape for k in example)
  # Nearest sampling of the centre window, pixel centres mapped linearly.
  top, left = (H - H / scale) / 2, (W - W / scale) / 2
  rows = np.floor(top + (np.arange(H) + 0.5) / scale).astype(int)
  cols = np.floor(left + (np.arange(W) + 0.5) / scale).astype(int)
  expected = example["semseg"][rows][:, cols]
  np.testing.assert_array_equal(zoomed["semseg"], expected)
  np.testing.assert_array_equal(zoomed["human_parts"], example["human_parts"][rows][:, cols])
  np.testing.assert_allclose(zoomed["depth"], example["depth"][rows][:, cols] / scale, rtol=1e-6)
  assert 255 in zoomed["semseg"] or 255 not in expected
  assert_aligned(zoomed)


def test_rotate_scale_keeps_labels_discrete_and_aligned():
  example = blocky_example()
  out = transforms.rotate_scale(example, angle=17.0, scale=1.2)
  for key in ("semseg", "human_parts"):
    assert set(np.unique(out[key])) <= set(np.unique(example[key])) | {0}
  assert set(np.unique(out["depth"])) <= set(np.unique(example["depth"] / np.float32(1.2))) | {0}
  assert not np.array_equal(out["semseg"], example["semseg"])
  assert_aligned(out, radius=2)
  # Zoomed out: the uncovered borders are 0 in the image and the labels.
  small = transforms.rotate_scale(example, angle=0.0, scale=0.75)
  assert np.all(small["image"][0] == 0) and np.all(small["semseg"][0] == 0)
  assert np.all(small["depth"][0] == 0)


def test_rotation_by_180_degrees_is_exact():
  example = blocky_example()
  out = transforms.rotate_scale(example, angle=180.0, scale=1.0)
  np.testing.assert_array_equal(out["semseg"], example["semseg"][::-1, ::-1])
  np.testing.assert_array_equal(out["depth"], example["depth"][::-1, ::-1])


def test_all_ignore_part_map_stays_ignore():
  example = blocky_example()
  example["human_parts"] = np.full((H, W), 255, np.uint8)
  out = transforms.rotate_scale(example, angle=10.0, scale=0.8)
  assert np.all(out["human_parts"] == 255)


def test_resize_labels_nearest_image_smooth():
  example = blocky_example()
  out = transforms.resize(example, (64, 96))
  assert out["image"].shape == (64, 96, 3) and out["semseg"].shape == (64, 96)
  np.testing.assert_array_equal(out["semseg"], np.kron(example["semseg"], np.ones((2, 2), int)))
  assert set(np.unique(out["depth"])) <= set(np.unique(example["depth"]))
  assert_aligned(out, radius=5)


def record(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An example in the prepared-record form (labels [H, W, 1] uint8)."""
  out = {"image": example["image"], "image_id": b"x", "original_size": np.array([H, W], np.int32),
         "depth": example["depth"]}
  for task in ("semseg", "human_parts"):
    out[task] = example[task][..., None]
  return out


def test_train_transform_seeded_dtypes_and_forced_zoom_scales_depth():
  tasks = ("semseg", "depth", "human_parts")
  example = blocky_example()
  params = transforms.AugmentParams(flip_probability=0.5, zoom_scales=(1.0, 1.2, 1.5),
                                    max_rotation=20.0, scale_range=(0.75, 1.25))
  transform = transforms.TrainTransform(tasks, (24, 40), params)
  a = transform.random_map(record(example), np.random.default_rng(4))
  b = transform.random_map(record(example), np.random.default_rng(4))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert a["image"].dtype == np.float32 and a["image"].shape == (24, 40, 3)
  assert a["semseg"].dtype == np.int32 and a["depth"].dtype == np.float32
  assert set(np.unique(a["semseg"])) <= set(np.unique(example["semseg"])) | {0}
  outputs = {transform.random_map(record(example), np.random.default_rng(s))["image"].tobytes()
             for s in range(6)}
  assert len(outputs) > 1

  zoom_only = transforms.TrainTransform(
      tasks, (H, W), transforms.AugmentParams(flip_probability=0.0, zoom_scales=(1.5,)))
  out = zoom_only.random_map(record(example), np.random.default_rng(0))
  np.testing.assert_array_equal(
      out["depth"], transforms.centre_zoom(example, 1.5)["depth"])
  assert out["depth"].max() <= example["depth"].max() / 1.5 + 1e-6

  plain = transforms.TrainTransform(tasks, (H, W), None)
  out = plain.random_map(record(example), np.random.default_rng(0))
  np.testing.assert_array_equal(out["semseg"], example["semseg"])
  np.testing.assert_allclose(out["image"], transforms.normalize_image(example["image"]))
  np.testing.assert_allclose(transforms.normalize_image(np.full((1, 1, 3), 255, np.uint8))[0, 0],
                             (1 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD, rtol=1e-6)


def test_flip_happens_about_half_the_time_and_aligned():
  tasks = ("semseg", "depth", "human_parts")
  example = blocky_example(with_ignore=False)
  transform = transforms.TrainTransform(tasks, (H, W), transforms.AugmentParams())
  flips = 0
  for seed in range(40):
    out = transform.random_map(record(example), np.random.default_rng(seed))
    if np.array_equal(out["semseg"], example["semseg"][:, ::-1]):
      flips += 1
      np.testing.assert_array_equal(out["depth"], example["depth"][:, ::-1])
    else:
      np.testing.assert_array_equal(out["semseg"], example["semseg"])
  assert 10 <= flips <= 30


def test_eval_transform_pads_labels_at_original_size():
  example = blocky_example()
  transform = transforms.EvalTransform(("semseg", "depth"), (16, 24), (40, 56))
  out = transform.map(record(example))
  assert out["image"].shape == (16, 24, 3)
  assert out["semseg"].shape == (40, 56) and out["depth"].shape == (40, 56)
  np.testing.assert_array_equal(out["semseg"][:H, :W], example["semseg"])
  assert np.all(out["semseg"][H:] == 255) and np.all(out["semseg"][:, W:] == 255)
  assert np.all(out["depth"][H:] == 0)
  np.testing.assert_array_equal(out["original_size"], [H, W])
  assert out["example_mask"] and out["image_id"] == "x"
