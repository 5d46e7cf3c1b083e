"""Readers and builders: the real samples round-trip, task subsets, and every bad input's error."""

import os
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_pipelines import builders
from data_pipelines import config as config_lib
from data_pipelines import io_utils
from data_pipelines import nyud
from data_pipelines import pascal_context
from data_pipelines import pipeline
from data_pipelines import synthetic
from data_pipelines import transforms

SIZE = (24, 32)

pytestmark = pytest.mark.filterwarnings("ignore::data_pipelines.io_utils.SplitSizeWarning")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("base")
  synthetic.write_nyud(str(root / "NYUD_MT"), num_train=2, num_val=1, seed=0, height=SIZE[0],
                       width=SIZE[1])
  synthetic.write_pascal(str(root / "PASCAL_MT"), num_train=2, num_val=1, seed=0,
                         height=SIZE[0], width=SIZE[1])
  return {"nyud": str(root / "NYUD_MT"), "pascal": str(root / "PASCAL_MT")}


@pytest.fixture
def nyud_copy(base_dirs, tmp_path):
  path = tmp_path / "NYUD_MT"
  shutil.copytree(base_dirs["nyud"], path)
  return str(path)


@pytest.fixture
def pascal_copy(base_dirs, tmp_path):
  path = tmp_path / "PASCAL_MT"
  shutil.copytree(base_dirs["pascal"], path)
  return str(path)


def dataset_config(name, data_dir, tasks=None, **overrides):
  cfg = config_lib.get_dataset_config(name)
  cfg.data_dir = data_dir
  if tasks is not None:
    cfg.tasks = tasks
  cfg.train_size = cfg.eval_size = cfg.eval_label_size = SIZE
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


# ----------------------------------------------------------------------------- real samples


def test_real_nyud_sample_round_trips_through_the_builder(shared_data_dir, tmp_path):
  root = str(shared_data_dir / "nyud_mt_sample")
  builder = builders.get_builder("nyud", ("semseg", "depth"), str(tmp_path))
  with pytest.warns(io_utils.SplitSizeWarning, match="published split has 795"):
    builders.prepare(builder, root)
  assert builder.name == "nyud_v2_mt" and builder.info.file_format.value == "array_record"
  source = builder.as_data_source(split="val")
  ids = [line.strip() for line in open(os.path.join(root, "gt_sets", "val.txt")) if line.strip()]
  assert len(source) == len(ids)
  for index, image_id in enumerate(ids):
    record = source[index]
    assert record["image_id"].decode() == image_id
    raw_seg = np.asarray(Image.open(os.path.join(root, "segmentation", f"{image_id}.png")))
    expected = np.where(raw_seg == 0, 255, raw_seg.astype(int) - 1)
    np.testing.assert_array_equal(record["semseg"][..., 0], expected)
    assert set(np.unique(record["semseg"])) == set(np.unique(expected))
    np.testing.assert_array_equal(
        record["depth"], np.load(os.path.join(root, "depth", f"{image_id}.npy")))
    np.testing.assert_array_equal(
        record["image"], np.asarray(Image.open(os.path.join(root, "images", f"{image_id}.jpg"))))
    np.testing.assert_array_equal(record["original_size"], [480, 640])


def test_real_nyud_sample_eval_batch_keeps_label_values(shared_data_dir, tmp_path):
  root = str(shared_data_dir / "nyud_mt_sample")
  cfg = config_lib.get_dataset_config("nyud")
  cfg.data_dir, cfg.prepared_dir = root, str(tmp_path)
  cfg.eval_size = (240, 320)
  batch = next(iter(pipeline.create_eval_dataset(cfg, 2)))
  assert batch["image"].shape == (2, 240, 320, 3)
  for i, image_id in enumerate(batch["image_id"]):
    raw_seg = np.asarray(Image.open(os.path.join(root, "segmentation", f"{image_id}.png")))
    np.testing.assert_array_equal(batch["semseg"][i], np.where(raw_seg == 0, 255, raw_seg - 1))
    np.testing.assert_array_equal(batch["depth"][i],
                                  np.load(os.path.join(root, "depth", f"{image_id}.npy")))
    assert (batch["depth"][i] == 0).mean() > 0.1  # invalid pixels stay 0


def _pascal_from_real_samples(samples: str, out: str) -> dict[str, dict[str, np.ndarray]]:
  """A PASCAL_MT folder from the real Person-Part and VOC labels; returns the expected labels."""
  part_names = {1: "head", 2: "torso", 3: "luarm", 4: "llarm", 5: "luleg", 6: "llleg"}
  for sub in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "human_parts", "sal_distill"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  expected = {}
  for folder in ("Person", "VOC"):
    for name in sorted(os.listdir(os.path.join(samples, folder))):
      if not name.endswith(".jpg"):
        continue
      image_id = name[:-4]
      shutil.copy(os.path.join(samples, folder, name), os.path.join(out, "JPEGImages", name))
      label = np.asarray(Image.open(os.path.join(samples, folder, f"{image_id}.png")))
      if folder == "Person":
        parts = label
        person = parts > 0
        semseg = np.where(person, 15, 0).astype(np.uint8)
        objects = [("person", 15, person,
                    [(part_names[p], parts == p) for p in range(1, 7) if (parts == p).any()])]
        expected_parts = parts
      else:
        semseg = label
        objects = [("car", 7, label == 7, [])]
        expected_parts = np.full(label.shape, 255, np.uint8)
      Image.fromarray(semseg).save(os.path.join(out, "semseg", "VOC12", f"{image_id}.png"))
      sal = np.where((semseg > 0) & (semseg < 255), 255, 0).astype(np.uint8)
      Image.fromarray(sal).save(os.path.join(out, "sal_distill", f"{image_id}.png"))
      scipy.io.savemat(os.path.join(out, "human_parts", f"{image_id}.mat"),
                       {"anno": synthetic._mat_struct(objects)})  # pylint: disable=protected-access
      expected[image_id] = {"semseg": semseg, "human_parts": expected_parts, "sal": sal // 255}
  ids = sorted(expected)
  for split in ("train", "val"):
    with open(os.path.join(out, "ImageSets", "Context", f"{split}.txt"), "w") as f:
      f.write("\n".join(ids) + "\n")
  return expected


def test_real_pascal_labels_round_trip_through_the_builder(shared_data_dir, tmp_path):
  root = str(tmp_path / "PASCAL_MT")
  expected = _pascal_from_real_samples(str(shared_data_dir / "pascal_samples"), root)
  builder = builders.get_builder("pascal", ("semseg", "human_parts", "sal"),
                                 str(tmp_path / "prepared"))
  builders.prepare(builder, root)
  source = builder.as_data_source(split="train")
  assert len(source) == len(expected)
  saw_parts = False
  for index in range(len(source)):
    record = source[index]
    labels = expected[record["image_id"].decode()]
    for task in ("semseg", "human_parts", "sal"):
      np.testing.assert_array_equal(record[task][..., 0], labels[task], err_msg=task)
    saw_parts |= bool(set(np.unique(record["human_parts"])) >= set(range(7)))
  assert saw_parts


# ----------------------------------------------------------------------------- task subsets


def test_only_the_requested_tasks_files_are_needed(nyud_copy, tmp_path):
  shutil.rmtree(os.path.join(nyud_copy, "depth"))
  cfg = dataset_config("nyud", nyud_copy, tasks=("semseg",))
  batch = next(iter(pipeline.create_train_dataset(cfg, 2, seed=0)))
  assert set(batch) == {"image", "semseg"}
  with pytest.raises(FileNotFoundError, match=r"depth label .*depth/000000\.npy"):
    pipeline.num_examples(dataset_config("nyud", nyud_copy, prepared_dir=str(tmp_path / "p")),
                          "train")


def test_pascal_task_subset(pascal_copy):
  shutil.rmtree(os.path.join(pascal_copy, "human_parts"))
  cfg = dataset_config("pascal", pascal_copy, tasks=("sal", "semseg"))
  batch = next(iter(pipeline.create_train_dataset(cfg, 2, seed=0)))
  assert set(batch) == {"image", "semseg", "sal"}
  with pytest.raises(ValueError, match="has no task"):
    builders.get_builder("pascal", ("depth",), pascal_copy + "_x")


# ----------------------------------------------------------------------------- bad inputs


def test_missing_or_unset_data_folder_says_how_to_get_the_data(tmp_path):
  missing = str(tmp_path / "nowhere" / "NYUD_MT")
  with pytest.raises(FileNotFoundError, match=r"nowhere/NYUD_MT not found.*NYUD_MT archive"
                     r".*data_pipelines\.synthetic"):
    pipeline.create_train_dataset(dataset_config("nyud", missing), 2, seed=0)
  with pytest.raises(FileNotFoundError, match=r"data_dir is empty.*PASCAL_MT\.tgz"):
    pipeline.create_eval_dataset(dataset_config("pascal", ""), 2)


def test_missing_split_file(nyud_copy, pascal_copy):
  os.remove(os.path.join(nyud_copy, "gt_sets", "val.txt"))
  with pytest.raises(FileNotFoundError, match=r"split file .*gt_sets/val\.txt not found"):
    nyud.split_ids(nyud_copy, "val")
  os.remove(os.path.join(pascal_copy, "ImageSets", "Context", "train.txt"))
  with pytest.raises(FileNotFoundError, match=r"ImageSets/Context/train\.txt not found"):
    pipeline.num_examples(dataset_config("pascal", pascal_copy), "train")


def test_split_size_differing_from_published_warns(nyud_copy):
  with pytest.warns(io_utils.SplitSizeWarning, match=r"lists 2 images; the published split has 795"):
    assert nyud.split_ids(nyud_copy, "train") == ["000000", "000001"]


@pytest.mark.parametrize("relative", ["images/000001.jpg", "segmentation/000001.png",
                                      "depth/000001.npy", "normals/000001.npy",
                                      "edge/000001.npy"])
def test_missing_nyud_file(nyud_copy, relative):
  os.remove(os.path.join(nyud_copy, relative))
  with pytest.raises(FileNotFoundError, match=relative.replace(".", r"\.") + " not found"):
    nyud.read_example(nyud_copy, "000001", nyud.TASKS)


@pytest.mark.parametrize("relative", ["JPEGImages/2008_000001.jpg", "human_parts/2008_000001.mat",
                                      "sal_distill/2008_000001.png",
                                      "normals_distill/2008_000001.png",
                                      "pascal-context/trainval/2008_000001.mat"])
def test_missing_pascal_file(pascal_copy, relative):
  os.remove(os.path.join(pascal_copy, relative))
  with pytest.raises(FileNotFoundError, match=relative.replace(".", r"\.") + " not found"):
    pascal_context.read_example(pascal_copy, "2008_000001", pascal_context.TASKS)


def test_missing_pascal_semseg_names_both_places(pascal_copy):
  for sub in ("VOC12", "pascal-context"):
    path = os.path.join(pascal_copy, "semseg", sub, "2008_000001.png")
    if os.path.exists(path):
      os.remove(path)
  with pytest.raises(FileNotFoundError, match=r"VOC12/2008_000001\.png nor .*pascal-context"):
    pascal_context.read_example(pascal_copy, "2008_000001", ("semseg",))


def test_wrong_label_size_through_the_pipeline(nyud_copy):
  path = os.path.join(nyud_copy, "segmentation", "000001.png")
  Image.fromarray(np.ones((SIZE[0] + 1, SIZE[1]), np.uint8)).save(path)
  with pytest.raises(io_utils.DataError,
                     match=r"semseg label .*000001\.png is 25x32 but its image is 24x32"):
    pipeline.create_train_dataset(dataset_config("nyud", nyud_copy), 2, seed=0)


def test_wrong_depth_size_and_bad_depth_values(nyud_copy):
  path = os.path.join(nyud_copy, "depth", "000000.npy")
  np.save(path, np.ones((SIZE[0], SIZE[1] + 2), np.float32))
  with pytest.raises(io_utils.DataError, match=r"depth label .*000000\.npy is 24x34"):
    nyud.read_example(nyud_copy, "000000", ("depth",))
  np.save(path, -np.ones(SIZE, np.float32))
  with pytest.raises(io_utils.DataError, match=r"000000\.npy holds negative or non-finite"):
    nyud.read_example(nyud_copy, "000000", ("depth",))
  with open(path, "wb") as f:
    f.write(b"not numpy")
  with pytest.raises(io_utils.DataError, match=r"cannot load depth label .*000000\.npy"):
    nyud.read_example(nyud_copy, "000000", ("depth",))


def test_unreadable_image(pascal_copy):
  path = os.path.join(pascal_copy, "JPEGImages", "2008_000000.jpg")
  with open(path, "wb") as f:
    f.write(b"\xff\xd8 truncated jpeg")
  with pytest.raises(io_utils.DataError, match=r"cannot decode image .*2008_000000\.jpg"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("sal",))


def test_unreadable_or_malformed_mat(pascal_copy):
  path = os.path.join(pascal_copy, "human_parts", "2008_000000.mat")
  with open(path, "wb") as f:
    f.write(b"MATLAB garbage")
  with pytest.raises(io_utils.DataError, match=r"cannot read human_parts file .*2008_000000\.mat"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))
  scipy.io.savemat(path, {"something_else": np.zeros(3)})
  with pytest.raises(io_utils.DataError, match="cannot read human_parts file"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))
  mask = np.ones(SIZE, bool)
  scipy.io.savemat(path, {"anno": synthetic._mat_struct(  # pylint: disable=protected-access
      [("person", 15, mask, [("tail", mask)])])})
  with pytest.raises(io_utils.DataError, match=r"unknown person part name 'tail'"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))
  small = np.ones((3, 3), bool)
  scipy.io.savemat(path, {"anno": synthetic._mat_struct(  # pylint: disable=protected-access
      [("person", 15, small, [("head", small)])])})
  with pytest.raises(io_utils.DataError, match=r"mask of part 'head' .* is \(3, 3\)"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))


def test_human_parts_decoding_rules(pascal_copy):
  path = os.path.join(pascal_copy, "human_parts", "2008_000000.mat")
  shape = np.asarray(Image.open(os.path.join(pascal_copy, "JPEGImages", "2008_000000.jpg"))).shape
  head = np.zeros(shape[:2], bool)
  head[:4, :4] = True
  hand = np.zeros_like(head)
  hand[10, 10] = True
  wheel = np.zeros_like(head)
  wheel[15:, 20:] = True
  scipy.io.savemat(path, {"anno": synthetic._mat_struct([  # pylint: disable=protected-access
      ("car", 7, wheel, [("wheel_1", wheel)]),  # not a person: its parts are not human parts
      ("person", 15, head | hand, [("nose", head), ("rhand", hand)])])})
  parts = pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))["human_parts"]
  assert parts[0, 0] == 1 and parts[10, 10] == 4 and parts[16, 21] == 0
  assert set(np.unique(parts)) == {0, 1, 4}
  # No person part at all: the whole map is ignore.
  scipy.io.savemat(path, {"anno": synthetic._mat_struct(  # pylint: disable=protected-access
      [("car", 7, wheel, []), ("person", 15, head, [])])})
  parts = pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))["human_parts"]
  assert np.all(parts == 255)


def _read_parts(pascal_copy, objects):
  path = os.path.join(pascal_copy, "human_parts", "2008_000000.mat")
  scipy.io.savemat(path, {"anno": synthetic._mat_struct(objects)})  # pylint: disable=protected-access
  return pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))["human_parts"]


def test_human_parts_with_only_empty_masks_are_ignored(pascal_copy):
  """The survey's loader: a person whose part masks are all empty paints nothing, the map stays
  all background and AddIgnoreRegions makes it 255; a person with an empty instance mask does
  not count as a person (has_human_parts); no person at all: 255 as well."""
  shape = np.asarray(Image.open(os.path.join(pascal_copy, "JPEGImages", "2008_000000.jpg"))).shape
  body = np.zeros(shape[:2], bool)
  body[2:10, 3:8] = True
  empty = np.zeros_like(body)
  # A hand-made .mat: a person with parts whose masks are all empty.
  parts = _read_parts(pascal_copy, [("person", 15, body, [("head", empty), ("torso", empty)])])
  assert parts.dtype == np.uint8 and np.all(parts == 255)
  # Parts drawn, but the person's instance mask is empty: the survey skips the image.
  assert np.all(_read_parts(pascal_copy, [("person", 15, empty, [("head", body)])]) == 255)
  # No person at all; a person without parts.
  assert np.all(_read_parts(pascal_copy, [("car", 7, body, [])]) == 255)
  assert np.all(_read_parts(pascal_copy, [("person", 15, body, [])]) == 255)
  # One real part among empty ones is enough: background 0 elsewhere.
  head = np.zeros_like(body)
  head[2, 3] = True
  parts = _read_parts(pascal_copy, [("person", 15, body, [("torso", empty), ("head", head)])])
  assert parts[2, 3] == 1 and set(np.unique(parts)) == {0, 1}
  # Through the pipeline, the ignored map stays ignore in training and evaluation batches.
  _read_parts(pascal_copy, [("person", 15, body, [("head", empty)])])
  cfg = dataset_config("pascal", pascal_copy, tasks=("human_parts",), augment=False,
                       eval_split="train")
  batch = next(iter(pipeline.create_eval_dataset(cfg, 1)))
  assert batch["image_id"][0] == "2008_000000" and np.all(batch["human_parts"][0] == 255)
  train = next(iter(pipeline.create_train_dataset(cfg, 2, seed=0)))
  assert any(np.all(m == 255) for m in train["human_parts"])


@pytest.mark.parametrize("dataset,value", [("nyud", 41), ("pascal", 21)])
def test_unexpected_label_value(nyud_copy, pascal_copy, dataset, value):
  if dataset == "nyud":
    root, path, reader, image_id = (nyud_copy, os.path.join(nyud_copy, "segmentation",
                                                            "000000.png"), nyud, "000000")
  else:
    image_id = "2008_000000"
    root, reader = pascal_copy, pascal_context
    path = pascal_context.semseg_path(pascal_copy, image_id)
  label = np.asarray(Image.open(path)).copy()
  label[3, 5] = value
  Image.fromarray(label).save(path)
  with pytest.raises(io_utils.DataError,
                     match=rf"semseg label .*{image_id}\.png holds unexpected values \[{value}\]"):
    reader.read_example(root, image_id, ("semseg",))


def test_label_of_the_wrong_kind(nyud_copy):
  path = os.path.join(nyud_copy, "segmentation", "000000.png")
  Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(path)
  with pytest.raises(io_utils.DataError, match=r"000000\.png has PIL mode 'RGB'"):
    nyud.read_example(nyud_copy, "000000", ("semseg",))


@pytest.mark.parametrize("task", ["semseg", "sal"])
def test_label_saved_as_jpeg_under_a_png_name(nyud_copy, pascal_copy, task):
  if task == "semseg":
    path, read = (os.path.join(nyud_copy, "segmentation", "000000.png"),
                  lambda: nyud.read_example(nyud_copy, "000000", ("semseg",)))
  else:
    path = os.path.join(pascal_copy, "sal_distill", "2008_000000.png")
    read = lambda: pascal_context.read_example(pascal_copy, "2008_000000", ("sal",))  # noqa: E731
  height, width = np.asarray(Image.open(path)).shape[:2]
  rows, cols = np.mgrid[:height, :width]
  low, high = (5, 7) if task == "semseg" else (0, 255)
  label = np.where(rows * width > cols * height, low, high).astype(np.uint8)  # a diagonal edge
  Image.fromarray(label).save(path, format="JPEG", quality=75)
  stored = np.asarray(Image.open(path))
  # The compression made new values the range check allows (semseg: 6 is a class as well).
  assert len(np.unique(stored)) > 2 and stored.max() <= (40 if task == "semseg" else 255)
  with pytest.raises(io_utils.DataError, match=rf"{task} label .*\.png is a JPEG file; expected "
                     r"a PNG as published"):
    read()


def test_duplicate_ids_in_a_split(nyud_copy):
  with open(os.path.join(nyud_copy, "gt_sets", "train.txt"), "a") as f:
    f.write("000000\n")
  with pytest.raises(io_utils.DataError, match=r"lists ids more than once: \['000000'\]"):
    nyud.split_ids(nyud_copy, "train")


def test_eval_label_canvas_too_small(pascal_copy):
  cfg = dataset_config("pascal", pascal_copy, eval_label_size=(8, 8))
  with pytest.raises(ValueError, match="does not fit the eval_label_size canvas 8x8"):
    next(iter(pipeline.create_eval_dataset(cfg, 1)))
  assert transforms.pad_to_canvas(np.ones((2, 3)), (4, 4), 255).shape == (4, 4)


def test_prepared_copy_is_redone_when_the_folder_is_rewritten(tmp_path):
  root = str(tmp_path / "NYUD_MT")
  synthetic.write_nyud(root, num_train=2, num_val=1, seed=0, height=SIZE[0], width=SIZE[1])
  cfg = dataset_config("nyud", root)
  assert pipeline.num_examples(cfg, "train") == 2
  first = next(iter(pipeline.create_eval_dataset(cfg, 1)))["image"]
  assert pipeline.num_examples(cfg, "train") == 2  # reused: same folder, unchanged
  shutil.rmtree(root)
  synthetic.write_nyud(root, num_train=3, num_val=1, seed=1, height=SIZE[0], width=SIZE[1])
  assert pipeline.num_examples(cfg, "train") == 3
  assert not np.array_equal(next(iter(pipeline.create_eval_dataset(cfg, 1)))["image"], first)
  # Without the extracted folder, the prepared copy still serves.
  shutil.rmtree(root)
  assert pipeline.num_examples(cfg, "train") == 3


def test_wrong_data_folder_keeps_the_prepared_copy(tmp_path):
  root = str(tmp_path / "NYUD_MT")
  synthetic.write_nyud(root, num_train=2, num_val=1, seed=0, height=SIZE[0], width=SIZE[1])
  cfg = dataset_config("nyud", root, tasks=("semseg",), prepared_dir=str(tmp_path / "prepared"))
  assert pipeline.num_examples(cfg, "train") == 2
  builder = builders.get_builder("nyud", ("semseg",), cfg.prepared_dir)
  fingerprint = os.path.join(os.fspath(builder.data_dir), builders.FINGERPRINT_FILE)
  with open(fingerprint, "rb") as f:
    stored = f.read()
  # data_dir pointing at the parent folder: it exists, but holds no NYUD_MT split files.
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"split file .*gt_sets/train\.txt not found"):
    pipeline.num_examples(cfg, "train")
  assert builders.get_builder("nyud", ("semseg",), cfg.prepared_dir).is_prepared()
  # A folder whose split file cannot be read.
  other = str(tmp_path / "other")
  shutil.copytree(root, other)
  with open(os.path.join(other, "gt_sets", "val.txt"), "wb") as f:
    f.write("000002\r\n".encode("utf-16"))
  cfg.data_dir = other
  with pytest.raises(io_utils.DataError, match=r"split file .*gt_sets/val\.txt is not UTF-8"):
    pipeline.num_examples(cfg, "train")
  assert builders.get_builder("nyud", ("semseg",), cfg.prepared_dir).is_prepared()
  with open(fingerprint, "rb") as f:
    assert f.read() == stored
  cfg.data_dir = root
  assert pipeline.num_examples(cfg, "train") == 2


def test_split_file_with_a_byte_order_mark_or_in_utf16(nyud_copy):
  path = os.path.join(nyud_copy, "gt_sets", "train.txt")
  # Notepad's and PowerShell's "UTF-8" put a byte order mark first.
  with open(path, "wb") as f:
    f.write("\ufeff000000\r\n000001\r\n".encode("utf-8"))
  assert nyud.split_ids(nyud_copy, "train") == ["000000", "000001"]
  with open(path, "wb") as f:
    f.write("000000\r\n000001\r\n".encode("utf-16"))
  with pytest.raises(io_utils.DataError, match=r"split file .*gt_sets/train\.txt is not UTF-8 "
                     r"text .*UTF-16"):
    nyud.split_ids(nyud_copy, "train")


def test_depth_must_be_float_metres(nyud_copy):
  path = os.path.join(nyud_copy, "depth", "000000.npy")
  metres = np.load(path)
  assert metres.dtype == np.float32 and metres.max() > 1
  np.save(path, np.round(metres * 1000).astype(np.uint16))  # NYU's raw millimetres
  with pytest.raises(io_utils.DataError, match=r"depth label .*000000\.npy is uint16; expected "
                     r"float metres .*millimetres must be divided by 1000"):
    nyud.read_example(nyud_copy, "000000", ("depth",))
  np.save(path, metres.astype(np.complex64))
  with pytest.raises(io_utils.DataError, match=r"000000\.npy is complex64; expected float"):
    nyud.read_example(nyud_copy, "000000", ("depth",))
  np.save(path, metres.astype(np.float16))
  depth = nyud.read_example(nyud_copy, "000000", ("depth",))["depth"]
  np.testing.assert_array_equal(depth, metres.astype(np.float16).astype(np.float32))
  path = os.path.join(nyud_copy, "edge", "000000.npy")
  edge = np.load(path)
  np.save(path, edge.astype(np.complex64))
  with pytest.raises(io_utils.DataError, match=r"edge label .*000000\.npy is complex64"):
    nyud.read_example(nyud_copy, "000000", ("edge",))
  np.save(path, edge.astype(np.uint8))  # 0/1 integers are the same boundary map
  np.testing.assert_array_equal(nyud.read_example(nyud_copy, "000000", ("edge",))["edge"], edge)


def test_16bit_saliency_is_rejected_8bit_modes_are_read(pascal_copy):
  image_id = "2008_000000"
  path = os.path.join(pascal_copy, "sal_distill", f"{image_id}.png")
  sal = np.asarray(Image.open(path))
  assert Image.open(path).mode == "L"
  expected = (sal / 255 > 0.5).astype(np.uint8)
  assert 0 < expected.mean() < 1
  Image.fromarray(np.stack([sal] * 3, -1), mode="RGB").save(path)
  np.testing.assert_array_equal(
      pascal_context.read_example(pascal_copy, image_id, ("sal",))["sal"], expected)
  Image.fromarray(sal, mode="L").convert("P").save(path)
  assert Image.open(path).mode == "P"
  np.testing.assert_array_equal(
      pascal_context.read_example(pascal_copy, image_id, ("sal",))["sal"], expected)
  Image.fromarray(sal.astype(np.uint16) * 257).save(path)  # the same map in 16 bits
  assert Image.open(path).mode == "I;16"
  with pytest.raises(io_utils.DataError, match=rf"sal label .*{image_id}\.png has PIL mode "
                     r"'I;16'; expected an 8-bit PNG"):
    pascal_context.read_example(pascal_copy, image_id, ("sal",))


def test_16bit_image_is_rejected_8bit_modes_are_read(nyud_copy):
  path = os.path.join(nyud_copy, "images", "000000.jpg")
  grey = np.asarray(Image.open(path).convert("L"))
  Image.fromarray(grey.astype(np.uint16) * 257).save(path, format="PNG")
  assert Image.open(path).mode == "I;16"
  with pytest.raises(io_utils.DataError, match=r"image .*images/000000\.jpg has PIL mode "
                     r"'I;16'.*expected an 8-bit image"):
    nyud.read_example(nyud_copy, "000000", ("semseg",))
  # Grayscale and CMYK JPEGs convert to RGB as they are.
  for mode in ("L", "CMYK"):
    Image.fromarray(grey, mode="L").convert(mode).save(path, format="JPEG", quality=95)
    with Image.open(path) as stored:
      assert stored.mode == mode
      expected = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(nyud.read_example(nyud_copy, "000000", ("semseg",))["image"],
                                  expected)


def _raw_anno(objects: list[tuple]) -> np.ndarray:
  """A PASCAL-Part `anno` struct from raw field tuples (malformed ones included)."""
  obj_array = np.empty((1, len(objects)),
                       dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
  for i, obj in enumerate(objects):
    obj_array[0, i] = obj
  anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
  anno[0, 0] = ("2008_000000", obj_array)
  return anno


def test_malformed_human_parts_structs(pascal_copy):
  path = os.path.join(pascal_copy, "human_parts", "2008_000000.mat")
  shape = np.asarray(Image.open(os.path.join(pascal_copy, "JPEGImages", "2008_000000.jpg"))).shape
  mask = np.zeros(shape[:2], np.uint8)
  mask[2:8, 2:8] = 1
  head = np.empty((1, 1), dtype=[("part_name", "O"), ("mask", "O")])
  head[0, 0] = ("head", mask)
  scipy.io.savemat(path, {"anno": _raw_anno([("car", 7, mask, np.zeros((0, 0))),
                                             ("person", np.zeros((0, 0)), mask, head)])})
  with pytest.raises(io_utils.DataError, match=r"human_parts file .*2008_000000\.mat: object 1 "
                     r"has class_ind float64 of size 0; expected one class id"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))
  scipy.io.savemat(path, {"anno": synthetic._mat_struct(  # pylint: disable=protected-access
      [("person", 15, mask, [("head", mask), ("", mask)])])})
  with pytest.raises(io_utils.DataError, match=r"2008_000000\.mat: part 1 of object 0 has an "
                     r"empty or malformed part_name"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))
  name_only = np.empty((1, 1), dtype=[("part_name", "O")])
  name_only[0, 0] = ("head",)
  scipy.io.savemat(path, {"anno": _raw_anno([("person", 15, mask, name_only)])})
  with pytest.raises(io_utils.DataError, match=r"2008_000000\.mat: part 0 of object 0 has 1 "
                     r"field\(s\); expected \(part_name, mask\)"):
    pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))
  # The same objects, well formed, decode.
  scipy.io.savemat(path, {"anno": _raw_anno([("car", 7, mask, np.zeros((0, 0))),
                                             ("person", 15, mask, head)])})
  parts = pascal_context.read_example(pascal_copy, "2008_000000", ("human_parts",))["human_parts"]
  np.testing.assert_array_equal(parts, mask)


# ----------------------------------------------------------------------------- normals and edges


def test_nyud_normals_and_edges_in_the_published_format(nyud_copy):
  for image_id in ("000000", "000001", "000002"):
    raw_normals = np.load(os.path.join(nyud_copy, "normals", f"{image_id}.npy"))
    raw_edge = np.load(os.path.join(nyud_copy, "edge", f"{image_id}.npy"))
    assert raw_normals.dtype == np.float32 and raw_normals.shape == (*SIZE, 3)
    assert raw_edge.shape == SIZE and set(np.unique(raw_edge)) <= {0.0, 1.0}
    ex = nyud.read_example(nyud_copy, image_id, nyud.TASKS)
    np.testing.assert_array_equal(ex["normals"], raw_normals)
    np.testing.assert_array_equal(ex["edge"], raw_edge.astype(np.uint8))
    valid = np.any(ex["normals"] != 0, -1)
    np.testing.assert_allclose(np.linalg.norm(ex["normals"][valid], axis=-1), 1, atol=1e-5)
    np.testing.assert_array_equal(valid, ex["depth"] > 0)  # no normal without a depth reading


def test_nyud_real_sample_normals_and_edges(shared_data_dir, tmp_path):
  root = shared_data_dir / "nyud_mt_sample"
  if not (root / "normals").is_dir() or not (root / "edge").is_dir():
    pytest.skip(f"the NYUD_MT sample at {root} has no normals/ or edge/ folder")
  cfg = config_lib.get_dataset_config("nyud")
  cfg.data_dir, cfg.prepared_dir = str(root), str(tmp_path)
  cfg.tasks = ("normals", "edge")
  batch = next(iter(pipeline.create_eval_dataset(cfg, 1)))
  image_id = batch["image_id"][0]
  raw = np.load(root / "normals" / f"{image_id}.npy")
  np.testing.assert_array_equal(batch["normals"][0], raw.astype(np.float32))
  np.testing.assert_array_equal(batch["edge"][0],
                                np.load(root / "edge" / f"{image_id}.npy") >= 0.5)


def test_bad_nyud_normals_and_edges(nyud_copy):
  path = os.path.join(nyud_copy, "normals", "000000.npy")
  np.save(path, np.zeros(SIZE, np.float32))
  with pytest.raises(io_utils.DataError, match=r"normals label .*000000\.npy is float32 of shape "
                     r"\(24, 32\); expected a float \[H, W, 3\]"):
    nyud.read_example(nyud_copy, "000000", ("normals",))
  np.save(path, np.full((*SIZE, 3), 2.0, np.float32))
  with pytest.raises(io_utils.DataError, match=r"components outside \[-1, 1\]"):
    nyud.read_example(nyud_copy, "000000", ("normals",))
  np.save(path, np.zeros((SIZE[0], SIZE[1] + 1, 3), np.float32))
  with pytest.raises(io_utils.DataError, match=r"normals label .*000000\.npy is 24x33"):
    nyud.read_example(nyud_copy, "000000", ("normals",))
  path = os.path.join(nyud_copy, "edge", "000000.npy")
  np.save(path, np.full(SIZE, 255, np.uint8))
  with pytest.raises(io_utils.DataError, match=r"edge label .*000000\.npy holds values outside "
                     r"\[0, 1\] \(range 255.0..255.0\)"):
    nyud.read_example(nyud_copy, "000000", ("edge",))


def _write_context(pascal_copy, image_id, labels):
  scipy.io.savemat(os.path.join(pascal_copy, "pascal-context", "trainval", f"{image_id}.mat"),
                   {"LabelMap": labels.astype(np.uint16)})


def test_pascal_normals_only_on_classes_shared_with_nyud(pascal_copy):
  image_id = "2008_000000"
  shape = np.asarray(Image.open(os.path.join(pascal_copy, "JPEGImages", f"{image_id}.jpg"))).shape
  labels = np.full(shape[:2], 360)  # sky: not a NYUD-v2 class
  labels[:, :8] = 284  # person
  labels[:4, 8:16] = 427  # tvmonitor: the survey's custom addition
  labels[4:, 8:16] = 187  # grass
  _write_context(pascal_copy, image_id, labels)
  png = np.random.default_rng(0).integers(0, 256, (*shape[:2], 3)).astype(np.uint8)
  Image.fromarray(png, mode="RGB").save(
      os.path.join(pascal_copy, "normals_distill", f"{image_id}.png"))
  normals = pascal_context.read_example(pascal_copy, image_id, ("normals",))["normals"]
  expected = 2.0 * png.astype(np.float32) / 255.0 - 1.0
  valid = np.isin(labels, [284, 427])
  np.testing.assert_array_equal(normals[valid], expected[valid])
  assert np.all(normals[~valid] == 0)
  assert {284, 427} <= pascal_context.NORMALS_VALID_CLASSES
  # Sky, grass, ground, unknown.
  assert not {360, 187, 189, 431} & pascal_context.NORMALS_VALID_CLASSES
  assert len(pascal_context.NORMALS_VALID_CLASSES) == 170
  Image.fromarray(png[..., 0], mode="L").save(
      os.path.join(pascal_copy, "normals_distill", f"{image_id}.png"))
  with pytest.raises(io_utils.DataError, match=r"normals label .*2008_000000\.png has PIL mode "
                     r"'L'; expected an 8-bit RGB"):
    pascal_context.read_example(pascal_copy, image_id, ("normals",))


def test_context_label_map_ids_outside_the_459_classes(pascal_copy):
  image_id = "2008_000000"
  shape = np.asarray(Image.open(os.path.join(pascal_copy, "JPEGImages", f"{image_id}.jpg"))).shape
  labels = np.zeros(shape[:2], np.int64)  # 0: no class drawn
  labels[:, 10:] = 459  # the highest class id
  _write_context(pascal_copy, image_id, labels)
  assert pascal_context.read_example(pascal_copy, image_id, ("edge",))["edge"].any()
  labels[:3, :3] = 460
  labels[5, 5] = 60000
  _write_context(pascal_copy, image_id, labels)
  with pytest.raises(io_utils.DataError, match=rf"label map .*{image_id}\.mat holds class ids "
                     r"\[460, 60000\] outside 0\.\.459"):
    pascal_context.read_example(pascal_copy, image_id, ("normals", "edge"))


def test_pascal_edges_from_the_label_map(pascal_copy):
  image_id = "2008_000000"
  shape = np.asarray(Image.open(os.path.join(pascal_copy, "JPEGImages", f"{image_id}.jpg"))).shape
  labels = np.full(shape[:2], 5)
  labels[:, 10:] = 9  # one vertical boundary between columns 9 and 10
  _write_context(pascal_copy, image_id, labels)
  ex = pascal_context.read_example(pascal_copy, image_id, ("edge",))
  # Laplacian != 0 on both columns 9 and 10; thinning keeps a one-pixel line (which loses a
  # pixel at an end).
  assert set(np.flatnonzero(ex["edge"].any(0))) <= {9, 10}
  rows = ex["edge"].sum(1)
  assert np.all(rows <= 1) and np.all(rows[1:-1] == 1)
  # The evaluation's ground truth is SEISM's seg2bmap: the left pixel of each pair.
  expected = np.zeros(shape[:2], np.uint8)
  expected[:, 9] = 1
  np.testing.assert_array_equal(ex["edge_gt"], expected)


def test_seg2bmap_rules():
  seg = np.array([[1, 1, 2],
                  [1, 3, 2],
                  [1, 1, 1]])
  # Right, lower or lower-right neighbour differs; last row: right only; last column: lower
  # only; the corner never.
  np.testing.assert_array_equal(pascal_context.boundary_ground_truth(seg),
                                [[1, 1, 0],
                                 [1, 1, 1],
                                 [0, 0, 0]])


def test_edge_laplacian_equals_opencv_on_real_pascal_context_labels(shared_data_dir):
  import cv2
  samples = shared_data_dir / "pascal_samples"
  cmap = np.load(samples / "cmap.npy").astype(np.int64)
  code = {tuple(c): i for i, c in enumerate(cmap)}
  names = sorted(p.name for p in (samples / "Context").glob("*.png"))
  assert names
  for name in names:
    rgb = np.asarray(Image.open(samples / "Context" / name).convert("RGB")).astype(np.int64)
    labels = np.vectorize(lambda r, g, b: code[(r, g, b)])(rgb[..., 0], rgb[..., 1], rgb[..., 2])
    ours = pascal_context._laplacian(labels)  # pylint: disable=protected-access
    np.testing.assert_array_equal(ours, cv2.Laplacian(labels.astype(np.float64), cv2.CV_64F))
    edge = pascal_context.edges_from_labels(labels)
    boundary = ours != 0
    assert edge.any() and np.all(boundary[edge > 0])  # thinned: a subset of the raw response
    assert edge.sum() < boundary.sum()


def test_full_task_sets_round_trip_through_the_builders(base_dirs, tmp_path):
  for dataset, reader, split_id in (("nyud", nyud, "000002"), ("pascal", pascal_context,
                                                                "2009_000002")):
    builder = builders.get_builder(dataset, reader.TASKS, str(tmp_path / dataset))
    builders.prepare(builder, base_dirs[dataset])
    record = builder.as_data_source(split="val")[0]
    assert record["image_id"].decode() == split_id
    expected = reader.read_example(base_dirs[dataset], split_id, reader.TASKS)
    np.testing.assert_array_equal(transforms.decode_normals(record["normals"]),
                                  expected["normals"])
    np.testing.assert_array_equal(record["edge"][..., 0], expected["edge"])
    gt_key = builders.BOUNDARY_GT_FEATURE[dataset]
    np.testing.assert_array_equal(record[gt_key][..., 0], expected[gt_key])
  assert builders.BOUNDARY_GT_FEATURE == {"nyud": "edge", "pascal": "edge_gt"}
