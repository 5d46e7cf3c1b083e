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


# ----------------------------------------------------------------------------- normals and edges

S = 48  # square frame of the sphere tests
R = 20.0  # sphere radius in pixels


def sphere_normals() -> np.ndarray:
  """Normals [S, S, 3] of a sphere centred in the frame, seen from the front (x right, y down,
  facing the camera); 0 outside it. A rotation about the centre leaves this scene unchanged."""
  v, u = np.mgrid[0:S, 0:S] + 0.5 - S / 2
  inside = u ** 2 + v ** 2 < R ** 2
  z = -np.sqrt(np.maximum(R ** 2 - u ** 2 - v ** 2, 0.0))
  normals = np.stack([u, v, z], -1) / R
  return np.where(inside[..., None], normals, 0.0).astype(np.float32)


def sphere_example() -> dict[str, np.ndarray]:
  normals = sphere_normals()
  image = transforms.encode_normals_uint8(normals)[..., :3]
  return {"image": image, "normals": normals}


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Angle between the vectors of a and b; NaN where either is invalid (zero)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_flip_negates_the_x_component_of_normals():
  example = sphere_example()
  flipped = transforms.hflip(example)
  np.testing.assert_array_equal(flipped["normals"][..., 1:], example["normals"][:, ::-1, 1:])
  np.testing.assert_array_equal(flipped["normals"][..., 0], -example["normals"][:, ::-1, 0])
  # The mirrored sphere is the sphere: flipping with the image, normals stay geometric.
  np.testing.assert_allclose(flipped["normals"], sphere_normals(), atol=1e-6)
  assert example["normals"][24, 40, 0] > 0  # the input is not modified


@pytest.mark.parametrize("angle", [15.0, -30.0, 90.0])
def test_rotation_turns_normals_with_the_image(angle):
  sphere = sphere_normals()
  out = transforms.rotate_scale(sphere_example(), angle=angle, scale=1.0)["normals"]
  v, u = np.mgrid[0:S, 0:S] + 0.5 - S / 2
  interior = u ** 2 + v ** 2 < (R - 2) ** 2
  # A sphere turned about its centre is the same sphere: up to nearest sampling (< 1 pixel,
  # a few degrees here), the rotated normals are the sphere's normals at the same pixels.
  assert angles_deg(out, sphere)[interior].max() < 5.0
  # Turning the vectors the other way would be far off: the test can tell the sign.
  wrong = transforms.rotate_normals(transforms.rotate_normals(out, -angle), -angle)
  assert angles_deg(wrong, sphere)[interior].max() > 25.0
  # Uncovered or outside-the-sphere pixels are invalid (0), never a blend.
  norms = np.linalg.norm(out, axis=-1)
  assert np.all((norms == 0) | (np.abs(norms - 1) < 1e-5))


def test_normals_are_never_interpolated_across_invalid_pixels():
  rng = np.random.default_rng(0)
  blocks = rng.normal(size=(H // 8, W // 8, 3))
  blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True)
  blocks[1, 2] = blocks[2, 4] = 0.0  # invalid blocks
  blocks = blocks.astype(np.float32)
  normals = np.kron(blocks, np.ones((8, 8, 1), np.float32))
  example = {"image": blocky_example()["image"], "normals": normals}
  allowed = {tuple(v) for v in np.round(blocks.reshape(-1, 3), 5)}

  def vectors(x):
    return {tuple(v) for v in np.round(x.reshape(-1, 3), 5)}

  assert vectors(transforms.resize(example, (20, 70))["normals"]) <= allowed
  assert vectors(transforms.centre_zoom(example, 1.5)["normals"]) <= allowed
  turned = transforms.rotate_scale(example, angle=17.0, scale=1.2)["normals"]
  rotated = {tuple(v) for v in np.round(
      transforms.rotate_normals(blocks.reshape(1, -1, 3), 17.0)[0], 5)}
  assert vectors(turned) <= rotated | {(0.0, 0.0, 0.0)}
  assert (np.abs(turned).sum(-1) == 0).mean() > 0.05  # borders and invalid blocks stay invalid


def full_record(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = record(example)
  out["normals"] = example["normals"]
  out["edge"] = example["edge"][..., None]
  return out


def test_train_and_eval_transforms_with_normals_and_edges():
  example = blocky_example()
  normals = sphere_normals()[:H, :W]
  example["normals"] = normals
  example["edge"] = (example["semseg"] != np.roll(example["semseg"], 1, axis=1)).astype(np.uint8)
  tasks = ("semseg", "normals", "edge")
  params = transforms.AugmentParams(flip_probability=0.5, max_rotation=20.0,
                                    scale_range=(0.75, 1.25))
  out = transforms.TrainTransform(tasks, (24, 40), params).random_map(
      full_record(example), np.random.default_rng(2))
  assert out["normals"].dtype == np.float32 and out["normals"].shape == (24, 40, 3)
  assert out["edge"].dtype == np.int32 and set(np.unique(out["edge"])) <= {0, 1}
  norms = np.linalg.norm(out["normals"], axis=-1)
  assert np.all((norms == 0) | (np.abs(norms - 1) < 1e-5))

  out = transforms.EvalTransform(tasks, (16, 24), (40, 56)).map(full_record(example))
  assert out["normals"].shape == (40, 56, 3) and out["edge"].shape == (40, 56)
  np.testing.assert_array_equal(out["normals"][:H, :W], normals)
  assert np.all(out["normals"][H:] == 0) and np.all(out["edge"][:, W:] == 255)


def test_uint8_normals_records_decode_to_the_vectors():
  normals = sphere_normals()
  stored = transforms.encode_normals_uint8(normals)
  assert stored.dtype == np.uint8 and stored.shape == (S, S, 4)
  decoded = transforms.decode_normals(stored)
  valid = np.any(normals != 0, -1)
  np.testing.assert_array_equal(np.any(decoded != 0, -1), valid)
  np.testing.assert_allclose(decoded[valid], normals[valid], atol=1 / 255)
  # 8-bit values round-trip exactly (PASCAL's distilled PNGs).
  png = np.random.default_rng(0).integers(0, 256, (4, 5, 3))
  from_png = 2.0 * png / 255.0 - 1.0
  np.testing.assert_array_equal(transforms.encode_normals_uint8(from_png)[..., :3], png)


def test_human_parts_moved_out_of_the_frame_become_ignore():
  example = blocky_example(with_ignore=False)
  parts = np.zeros((H, W), np.uint8)
  parts[:4, :4] = 3  # an arm in the corner, cut away by a 1.5x centre zoom
  example["human_parts"] = parts
  zoom = transforms.TrainTransform(
      ("human_parts",), (H, W), transforms.AugmentParams(flip_probability=0.0,
                                                         zoom_scales=(1.5,)))
  out = zoom.random_map(record(example), np.random.default_rng(0))
  assert np.all(out["human_parts"] == 255)
  plain = transforms.TrainTransform(("human_parts",), (H, W), None)
  np.testing.assert_array_equal(plain.random_map(record(example), np.random.default_rng(0))[
      "human_parts"], parts)
