"""Synthetic NYUD_MT / PASCAL_MT folders: real file formats, consistent labels, determinism, CLI."""

import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_pipelines import nyud
from data_pipelines import pascal_context
from data_pipelines import synthetic

pytestmark = pytest.mark.filterwarnings("ignore::data_pipelines.io_utils.SplitSizeWarning")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, W = 60, 80


@pytest.fixture(scope="module")
def nyud_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("syn") / "NYUD_MT")
  synthetic.write_nyud(path, num_train=6, num_val=2, seed=0, height=H, width=W)
  return path


@pytest.fixture(scope="module")
def pascal_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("syn") / "PASCAL_MT")
  synthetic.write_pascal(path, num_train=6, num_val=2, seed=0, height=H, width=W)
  return path


def all_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


def test_nyud_layout_and_formats(nyud_dir):
  assert nyud.split_ids(nyud_dir, "train") == [f"{i:06d}" for i in range(6)]
  assert nyud.split_ids(nyud_dir, "val") == ["000006", "000007"]
  with Image.open(os.path.join(nyud_dir, "images", "000000.jpg")) as image:
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (W, H)
  with Image.open(os.path.join(nyud_dir, "segmentation", "000000.png")) as seg:
    assert seg.format == "PNG" and seg.mode == "L"
  depth = np.load(os.path.join(nyud_dir, "depth", "000000.npy"))
  assert depth.dtype == np.float32 and depth.shape == (H, W)


def test_nyud_scenes_are_consistent(nyud_dir):
  classes = set()
  for index in range(8):
    ex = nyud.read_example(nyud_dir, f"{index:06d}", nyud.TASKS)
    semseg, depth = ex["semseg"], ex["depth"]
    classes |= set(np.unique(semseg).tolist())
    assert 0.01 < (semseg == 255).mean() < 0.3  # void class boundaries, as NYUD-v2 has
    assert 0 < (depth == 0).mean() < 0.3 and depth.max() < 10
    floor, wall = nyud.NYU_CLASS_IDS["floor"], nyud.NYU_CLASS_IDS["wall"]
    # The floor recedes towards the horizon: nearer rows are lower in the image.
    rows = [depth[r][(semseg[r] == floor) & (depth[r] > 0)].mean() for r in range(H)
            if ((semseg[r] == floor) & (depth[r] > 0)).sum() > 3]
    assert len(rows) > 5 and np.all(np.diff(rows) < 1e-3)
    # Occlusion agrees with depth: furniture next to a wall pixel is nearer than that wall.
    furniture = np.isin(semseg, [nyud.NYU_CLASS_IDS[c] for c in ("bed", "chair", "table", "sofa",
                                                                  "cabinet", "bookshelf")])
    left, right = furniture[:, :-2], semseg[:, 2:] == wall
    valid = left & right & (depth[:, :-2] > 0) & (depth[:, 2:] > 0)
    if valid.any():
      assert np.all(depth[:, :-2][valid] < depth[:, 2:][valid])
  # Frequent NYU classes: wall, floor, ceiling and several furniture classes (0-based ids).
  assert {0, 1, 21} <= classes and len(classes - {0, 1, 21, 255}) >= 4


def test_pascal_layout_formats_and_consistency(pascal_dir):
  ids = pascal_context.split_ids(pascal_dir, "train") + pascal_context.split_ids(pascal_dir, "val")
  sizes, people = set(), 0
  for image_id in ids:
    ex = pascal_context.read_example(pascal_dir, image_id, pascal_context.TASKS)
    h, w = ex["image"].shape[:2]
    sizes.add((h, w))
    assert h <= H and w <= W
    semseg, parts, sal = ex["semseg"], ex["human_parts"], ex["sal"]
    assert set(np.unique(semseg)) <= {0, 5, 7, 15, 16, 20, 255}
    if np.all(parts == 255):
      assert not np.any(semseg == 15)
    else:
      people += 1
      # Parts lie on people only; most person pixels carry a part.
      assert np.all(semseg[parts > 0] != 0) and np.all(np.isin(semseg[parts > 0], [15, 255]))
      assert (parts[semseg == 15] > 0).mean() > 0.8
    foreground = (semseg > 0) & (semseg < 255)
    assert sal[foreground].mean() > 0.9 and sal[semseg == 0].mean() < 0.1
    anno = scipy.io.loadmat(os.path.join(pascal_dir, "human_parts", f"{image_id}.mat"))["anno"]
    objects = anno[0][0][1][0]
    assert all(obj[2].shape == (h, w) for obj in objects)
  assert people >= 3 and len(sizes) > 1
  assert os.listdir(os.path.join(pascal_dir, "semseg", "VOC12"))
  assert os.listdir(os.path.join(pascal_dir, "semseg", "pascal-context"))


def test_same_seed_same_bytes_other_seed_differs(nyud_dir, pascal_dir, tmp_path):
  for name, reference in (("nyud", nyud_dir), ("pascal", pascal_dir)):
    again, other = str(tmp_path / f"{name}_a"), str(tmp_path / f"{name}_b")
    synthetic.WRITERS[name](again, num_train=6, num_val=2, seed=0, height=H, width=W)
    synthetic.WRITERS[name](other, num_train=6, num_val=2, seed=1, height=H, width=W)
    files = all_files(reference)
    assert files == all_files(again) == all_files(other)
    data_files = [f for f in files if not f.endswith(".txt")]
    _, mismatch, errors = filecmp.cmpfiles(reference, again, files, shallow=False)
    assert not mismatch and not errors
    _, mismatch, _ = filecmp.cmpfiles(reference, other, data_files, shallow=False)
    assert len(mismatch) > len(data_files) // 2


def test_cli_writes_a_folder_and_rejects_bad_arguments(tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "data_pipelines.synthetic", "--dataset", "pascal", "--out",
         str(out), "--num-train", "2", "--num-val", "1", "--seed", "3", "--height", "24",
         "--width", "32"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "wrote 2 train and 1 val pascal examples" in result.stdout
  assert len(pascal_context.split_ids(str(out), "train")) == 2
  assert len(os.listdir(out / "human_parts")) == 3
  bad = subprocess.run(cmd[:4] + ["kitti", "--out", str(out)], cwd=REPO, capture_output=True,
                       text=True, check=False)
  assert bad.returncode == 2 and "invalid choice: 'kitti'" in bad.stderr


def test_nyud_normals_follow_the_room_geometry_and_edges_its_surfaces(nyud_dir):
  floor, wall, ceiling = (nyud.NYU_CLASS_IDS[c] for c in ("floor", "wall", "ceiling"))
  for index in range(8):
    ex = nyud.read_example(nyud_dir, f"{index:06d}", nyud.TASKS)
    semseg, depth, normals, edge = ex["semseg"], ex["depth"], ex["normals"], ex["edge"]
    valid = np.any(normals != 0, -1)
    np.testing.assert_array_equal(valid, depth > 0)
    np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=-1), 1, atol=1e-5)
    # Every visible surface faces the camera: the normal points against the pixel's ray (the
    # NYUD-v2 intrinsics the renderer uses; x right, y down, z forward).
    v, u = np.mgrid[0:H, 0:W] + 0.5
    rays = np.stack([(u - W / 2) / (518.8 * W / 640), (v - H / 2) / (519.5 * H / 480),
                     np.ones((H, W))], -1)
    assert np.all(np.sum(normals * rays, -1)[valid] < 0)
    # The floor is one plane facing up (y points down) and the ceiling the opposite one.
    up = normals[(semseg == floor) & valid]
    assert len(up) > 10 and np.ptp(up, axis=0).max() < 1e-5 and up[0, 1] < -0.9
    down = normals[(semseg == ceiling) & valid]
    if len(down):
      np.testing.assert_allclose(down[0] * [1, -1, 1], up[0] * [1, 1, -1], atol=1e-5)
    # Walls stand upright: perpendicular to the floor.
    walls = normals[(semseg == wall) & valid]
    np.testing.assert_allclose(walls @ up[0], 0, atol=1e-5)
    # Edges are the surface boundaries, thinned: they lie on the void boundaries between labels
    # (walls keep their label there) and cover most of them.
    void = semseg == 255
    assert 0.01 < edge.mean() < 0.3
    assert np.all(np.isin(semseg[edge == 1], [255, wall])) and edge[void].mean() > 0.5


def test_pascal_normals_and_context_labels_agree_with_the_objects(pascal_dir):
  context_of = {0: None, 5: 34, 7: 59, 15: 284, 16: 308, 20: 427}
  for image_id in pascal_context.split_ids(pascal_dir, "train"):
    ex = pascal_context.read_example(pascal_dir, image_id, pascal_context.TASKS)
    context = pascal_context.read_context_labels(pascal_dir, image_id, ex["image"].shape[:2])
    semseg, normals = ex["semseg"], ex["normals"]
    for voc, ctx in context_of.items():
      if ctx is not None:
        assert np.all(context[semseg == voc] == ctx)
    assert np.all(np.isin(context[semseg == 0], [360, 189]))  # sky, ground
    valid = np.any(normals != 0, -1)
    np.testing.assert_array_equal(valid, np.isin(context,
                                                 sorted(pascal_context.NORMALS_VALID_CLASSES)))
    np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=-1), 1, atol=0.02)
    assert np.all(normals[valid][:, 2] < 0)  # facing the camera
    # Edges lie on label-map boundaries.
    assert ex["edge"].any() and np.all(pascal_context._laplacian(context)[ex["edge"] > 0] != 0)  # pylint: disable=protected-access
