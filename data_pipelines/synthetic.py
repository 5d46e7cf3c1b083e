"""Synthetic NYUD_MT and PASCAL_MT folders: procedural scenes, byte-format identical to the real ones.

NYUD_MT: ray-cast rooms (floor, walls, ceiling) with furniture boxes, seen by a camera with the
NYUD-v2 intrinsics. Depth is the exact z-depth of the visible surface, labels are the visible
surface's class, so occlusion agrees between depth and labels. Every class has its own shape and
its own colour/texture (wood floors, striped beds, book-filled shelves, sky windows...), so a small
network can learn the scenes. Windows have no depth reading (0) and class boundaries are void (0),
as in the real frames. Normals are the visible face's plane normal in camera coordinates (x right,
y down, z forward, facing the camera), 0 where depth has no reading; edges are the boundaries
between surfaces, thinned to one-pixel lines.

PASCAL_MT: outdoor-like backgrounds with people (head, torso, arms, hands, legs, feet drawn as
PASCAL-Part parts), cars, TV monitors, bottles and potted plants; the person parts are stored in
the PASCAL-Part `.mat` structure, saliency marks the foreground objects. The PASCAL-Context label
map (`pascal-context/trainval/<id>.mat`: sky, ground or grass, and the objects' Context classes)
gives the edges; the distilled normals PNG holds the normals of the drawn shapes: flat faces for
cars and monitors, rounded blobs for people, bottles and plants.

Usage:
  python -m data_pipelines.synthetic --dataset nyud --out /tmp/NYUD_MT --num-train 64 \
      --num-val 16 --seed 0 [--height 480 --width 640]
"""

import argparse
import dataclasses
import io
import math
import os
import sys
from collections.abc import Sequence

import numpy as np
import scipy.io
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from skimage import morphology

# NYU-40 ids as stored in segmentation/*.png (1-based; 0 = void).
NYU_CLASSES = {
    "wall": 1, "floor": 2, "cabinet": 3, "bed": 4, "chair": 5, "sofa": 6, "table": 7, "door": 8,
    "window": 9, "bookshelf": 10, "picture": 11, "ceiling": 22,
}
JPEG_QUALITY = 92


# ----------------------------------------------------------------------------- NYUD_MT


@dataclasses.dataclass
class _Box:
  """An axis-aligned box in room coordinates (x right, y up, z away from the camera's wall)."""
  lo: np.ndarray
  hi: np.ndarray
  name: str
  colour: np.ndarray
  texture: str
  instance: int = 0


def _ray_box(origin: np.ndarray, dirs: np.ndarray, box: _Box):
  """Distances along `dirs` [N, 3] to the box's entry point (inf where missed) and hit axis."""
  with np.errstate(divide="ignore", invalid="ignore"):
    inv = 1.0 / dirs
    t1 = (box.lo - origin) * inv
    t2 = (box.hi - origin) * inv
  t_near = np.minimum(t1, t2)
  t_far = np.maximum(t1, t2)
  t_near = np.nan_to_num(t_near, nan=-np.inf)
  t_far = np.nan_to_num(t_far, nan=np.inf)
  axis = np.argmax(t_near, axis=1)
  t_enter = t_near.max(axis=1)
  t_exit = t_far.min(axis=1)
  hit = (t_exit >= t_enter) & (t_enter > 1e-3)
  return np.where(hit, t_enter, np.inf), axis


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 18) -> np.ndarray:
  return np.clip(np.asarray(colour, np.float64) + rng.normal(0, amount, 3), 10, 245)


def _furniture(rng: np.random.Generator, name: str, x: float, z: float, yaw_swap: bool,
               instance: int) -> list[_Box]:
  """The boxes of one piece of furniture standing on the floor at (x, z)."""
  def box(lo, hi, colour, texture):
    lo, hi = np.array(lo, float), np.array(hi, float)
    if yaw_swap:  # rotate the footprint by 90 degrees about its centre
      c = np.array([x, 0, z])
      lo_r, hi_r = lo - c, hi - c
      lo = c + np.array([lo_r[2], lo_r[1], lo_r[0]])
      hi = c + np.array([hi_r[2], hi_r[1], hi_r[0]])
      lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return _Box(lo, hi, name, colour, texture, instance)

  if name == "bed":
    w, d = rng.uniform(1.3, 1.8), rng.uniform(1.9, 2.1)
    sheet = _jitter(rng, (225, 225, 235), 10)
    frame = _jitter(rng, (120, 80, 50))
    return [box((x - w / 2, 0, z - d / 2), (x + w / 2, 0.3, z + d / 2), frame, "wood"),
            box((x - w / 2 + 0.03, 0.3, z - d / 2 + 0.03), (x + w / 2 - 0.03, 0.5, z + d / 2),
                sheet, "stripes"),
            box((x - w / 2, 0, z + d / 2 - 0.08), (x + w / 2, 1.0, z + d / 2), frame, "wood")]
  if name == "table":
    w, d, h = rng.uniform(0.9, 1.5), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.78)
    wood = _jitter(rng, (140, 90, 50))
    boxes = [box((x - w / 2, h - 0.05, z - d / 2), (x + w / 2, h, z + d / 2), wood, "wood")]
    for sx in (-1, 1):
      for sz in (-1, 1):
        lx, lz = x + sx * (w / 2 - 0.05), z + sz * (d / 2 - 0.05)
        boxes.append(box((lx - 0.03, 0, lz - 0.03), (lx + 0.03, h - 0.05, lz + 0.03), wood, "flat"))
    return boxes
  if name == "chair":
    s = rng.uniform(0.42, 0.5)
    colour = _jitter(rng, (170, 40, 40), 25)
    boxes = [box((x - s / 2, 0.42, z - s / 2), (x + s / 2, 0.47, z + s / 2), colour, "flat"),
             box((x - s / 2, 0.47, z + s / 2 - 0.05), (x + s / 2, 0.95, z + s / 2), colour,
                 "flat")]
    for sx in (-1, 1):
      for sz in (-1, 1):
        lx, lz = x + sx * (s / 2 - 0.03), z + sz * (s / 2 - 0.03)
        boxes.append(box((lx - 0.02, 0, lz - 0.02), (lx + 0.02, 0.42, lz + 0.02), colour * 0.6,
                         "flat"))
    return boxes
  if name == "sofa":
    w, d = rng.uniform(1.6, 2.2), rng.uniform(0.8, 0.95)
    colour = _jitter(rng, (50, 90, 130), 20)
    return [box((x - w / 2, 0, z - d / 2), (x + w / 2, 0.45, z + d / 2), colour, "fabric"),
            box((x - w / 2, 0.45, z + d / 2 - 0.2), (x + w / 2, 0.85, z + d / 2), colour,
                "fabric"),
            box((x - w / 2, 0.45, z - d / 2), (x - w / 2 + 0.15, 0.62, z + d / 2), colour,
                "fabric"),
            box((x + w / 2 - 0.15, 0.45, z - d / 2), (x + w / 2, 0.62, z + d / 2), colour,
                "fabric")]
  if name == "cabinet":
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.6), rng.uniform(0.8, 1.9)
    return [box((x - w / 2, 0, z - d / 2), (x + w / 2, h, z + d / 2), _jitter(rng, (200, 170, 120)),
                "panels")]
  if name == "bookshelf":
    w, d, h = rng.uniform(0.8, 1.4), rng.uniform(0.3, 0.4), rng.uniform(1.6, 2.1)
    return [box((x - w / 2, 0, z - d / 2), (x + w / 2, h, z + d / 2), _jitter(rng, (90, 60, 40)),
                "books")]
  raise ValueError(name)


FURNITURE = {  # name: (footprint half sizes for placement, weight)
    "bed": (1.1, 1.0), "table": (0.8, 1.0), "chair": (0.35, 1.4), "sofa": (1.1, 0.8),
    "cabinet": (0.6, 0.8), "bookshelf": (0.7, 0.7),
}
WALL_ITEMS = ("picture", "window", "door")


def _room(rng: np.random.Generator):
  """Samples a room: its size, camera pose, furniture and wall items."""
  room = {
      "left": -rng.uniform(1.5, 2.4), "right": rng.uniform(1.5, 2.4),
      "back": rng.uniform(3.5, 5.5), "front": -0.5, "height": rng.uniform(2.5, 3.0),
  }
  boxes: list[_Box] = []
  footprints = []
  names = list(FURNITURE)
  weights = np.array([FURNITURE[n][1] for n in names])
  instance = 1
  for _ in range(rng.integers(4, 9)):
    name = names[rng.choice(len(names), p=weights / weights.sum())]
    half = FURNITURE[name][0] + 0.15
    for _ in range(20):
      x = rng.uniform(room["left"] + half, max(room["left"] + half, room["right"] - half))
      z = rng.uniform(1.1 + half, max(1.1 + half, room["back"] - half))
      if rng.random() < 0.5:  # against the back wall
        z = room["back"] - half + 0.1
      if all(abs(x - fx) > half + fh or abs(z - fz) > half + fh for fx, fz, fh in footprints):
        footprints.append((x, z, half))
        boxes += _furniture(rng, name, x, z, yaw_swap=rng.random() < 0.3, instance=instance)
        instance += 1
        break
  # Wall items on the back wall (thin boxes 2 cm in front of it), without overlaps.
  spans = []
  for _ in range(rng.integers(2, 5)):
    name = WALL_ITEMS[rng.integers(len(WALL_ITEMS))]
    if name == "door":
      w, y0, y1 = rng.uniform(0.8, 1.0), 0.0, 2.05
      colour, texture = _jitter(rng, (150, 100, 60)), "panels"
    elif name == "window":
      w, y0 = rng.uniform(0.8, 1.6), rng.uniform(0.8, 1.1)
      y1 = min(y0 + rng.uniform(0.9, 1.3), room["height"] - 0.2)
      colour, texture = np.array([150.0, 200, 245]), "sky"
    else:
      w, y0 = rng.uniform(0.4, 0.9), rng.uniform(1.2, 1.6)
      y1 = y0 + rng.uniform(0.3, 0.7)
      colour, texture = _jitter(rng, (60, 40, 30)), "picture"
    x = rng.uniform(room["left"] + w / 2 + 0.1, room["right"] - w / 2 - 0.1)
    if all(abs(x - sx) > (w + sw) / 2 + 0.1 for sx, sw in spans):
      spans.append((x, w))
      zb = room["back"]
      boxes.append(_Box(np.array([x - w / 2, y0, zb - 0.02]), np.array([x + w / 2, y1, zb + 0.01]),
                        name, colour, texture, instance))
      instance += 1
  camera = {
      "x": rng.uniform(-0.3, 0.3), "y": rng.uniform(1.1, 1.6),
      "pitch": math.radians(rng.uniform(2, 15)), "yaw": math.radians(rng.uniform(-15, 15)),
  }
  colours = {
      "wall": _jitter(rng, rng.choice([(210, 200, 180), (190, 205, 215), (220, 210, 200),
                                       (200, 215, 190)]), 10),
      "floor": _jitter(rng, rng.choice([(150, 105, 65), (120, 120, 125), (175, 140, 95)]), 12),
      "ceiling": _jitter(rng, (238, 238, 235), 5),
  }
  return room, boxes, camera, colours


def _texture(kind: str, points: np.ndarray, axis: np.ndarray, rng_values: np.ndarray) -> np.ndarray:
  """A multiplicative brightness pattern [N] from the hit points' world coordinates."""
  x, y, z = points[:, 0], points[:, 1], points[:, 2]
  u = np.where(axis == 0, z, x)  # the surface's horizontal coordinate
  if kind == "wood":
    return 0.85 + 0.15 * np.sin(u * 40 + np.sin(y * 7 + u * 3) * 2)
  if kind == "planks":
    plank = np.floor(x / 0.18)
    return 0.8 + 0.2 * rng_values[(plank.astype(int) % len(rng_values))] \
        + 0.04 * np.sin(z * 30 + plank)
  if kind == "tiles":
    return np.where((np.floor(x / 0.5) + np.floor(z / 0.5)) % 2 == 0, 1.0, 0.75)
  if kind == "stripes":
    return 0.85 + 0.15 * (np.sin(u * 25) > 0)
  if kind == "fabric":
    return 0.9 + 0.1 * np.sin(u * 60) * np.sin(y * 60)
  if kind == "panels":
    return np.where((np.abs((u * 2.5) % 1 - 0.5) < 0.45) & (np.abs((y * 2.5) % 1 - 0.5) < 0.45),
                    1.0, 0.7)
  if kind == "books":
    shelf = (y * 3.0) % 1 < 0.1
    book = rng_values[(np.floor(u / 0.04).astype(int) % len(rng_values))]
    return np.where(shelf, 0.5, 0.6 + 0.8 * book)
  if kind == "picture":
    inner = rng_values[(np.floor(u / 0.15).astype(int) + 3 * np.floor(y / 0.15).astype(int))
                       % len(rng_values)]
    return 0.6 + 1.4 * inner
  return np.ones_like(x)


def render_room(rng: np.random.Generator, height: int, width: int):
  """Renders one synthetic NYUD-v2 frame.

  Returns:
    image uint8 [H, W, 3], semseg uint8 [H, W] (NYU-40 ids, 0 = void), depth float32 [H, W],
    normals float32 [H, W, 3] (unit, camera x right / y down / z forward; 0 = no depth reading),
    edge float32 [H, W] (1 on surface boundaries).
  """
  room, boxes, camera, colours = _room(rng)
  fx, fy = 518.8 * width / 640, 519.5 * height / 480
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  d_cam = np.stack([(u + 0.5 - width / 2) / fx, -(v + 0.5 - height / 2) / fy,
                    np.ones_like(u)], -1).reshape(-1, 3)
  cp, sp = math.cos(camera["pitch"]), math.sin(camera["pitch"])
  cy_, sy_ = math.cos(camera["yaw"]), math.sin(camera["yaw"])
  pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
  yaw = np.array([[cy_, 0, sy_], [0, 1, 0], [-sy_, 0, cy_]])
  dirs = d_cam @ (yaw @ pitch).T  # t along dirs is the camera z-depth
  origin = np.array([camera["x"], camera["y"], 0.0])

  n = dirs.shape[0]
  best_t = np.full(n, np.inf)
  label = np.zeros(n, np.int32)
  instance = np.zeros(n, np.int32)
  axis_hit = np.zeros(n, np.int32)
  colour = np.zeros((n, 3))
  texture = np.array([""] * n, dtype=object)
  planes = [  # (axis, value, name, instance id)
      (1, 0.0, "floor", -1), (1, room["height"], "ceiling", -2), (2, room["back"], "wall", -3),
      (0, room["left"], "wall", -4), (0, room["right"], "wall", -5), (2, room["front"], "wall", -6)]
  floor_texture = ("planks", "tiles")[rng.integers(2)]
  with np.errstate(divide="ignore", invalid="ignore"):
    for axis, value, name, inst in planes:
      t = (value - origin[axis]) / dirs[:, axis]
      t = np.where(t > 1e-3, t, np.inf)
      closer = t < best_t
      best_t[closer], label[closer], instance[closer], axis_hit[closer] = (
          t[closer], NYU_CLASSES[name], inst, axis)
      colour[closer] = colours[name]
      texture[closer] = {"floor": floor_texture}.get(name, "flat")
  for box in boxes:
    t, axis = _ray_box(origin, dirs, box)
    closer = t < best_t
    best_t[closer], label[closer], instance[closer] = t[closer], NYU_CLASSES[box.name], box.instance
    axis_hit[closer] = axis[closer]
    colour[closer] = box.colour
    texture[closer] = box.texture

  points = origin + dirs * best_t[:, None]
  shade = np.ones(n)
  rng_values = rng.random(64)
  for kind in set(texture.tolist()):
    sel = texture == kind
    shade[sel] = _texture(kind, points[sel], axis_hit[sel], rng_values)
  book_colours = rng.uniform(40, 230, (64, 3))
  books = texture == "books"
  if books.any():  # books: colourful spines
    idx = np.floor(np.where(axis_hit[books] == 0, points[books, 2], points[books, 0]) / 0.04)
    colour[books] = book_colours[idx.astype(int) % 64] * 0.5 + colour[books] * 0.5
  light = np.array([0.3, -1.0, 0.4]) / np.linalg.norm([0.3, -1.0, 0.4])
  lambert = 0.65 + 0.35 * np.abs(light[axis_hit])
  falloff = 1.0 / (1.0 + 0.02 * best_t ** 2)
  sky = texture == "sky"
  image = colour * (shade * lambert * falloff)[:, None]
  image[sky] = colour[sky] * (0.9 + 0.1 * shade[sky, None])
  image = image.reshape(height, width, 3) + rng.normal(0, 3, (height, width, 3))
  image = np.clip(image, 0, 255).astype(np.uint8)

  depth = best_t.reshape(height, width).astype(np.float32)
  depth[sky.reshape(height, width)] = 0.0  # the sensor gets no reading through glass
  if rng.random() < 0.5:  # the registered Kinect depth often lacks a band at the left edge
    depth[:, :max(1, width // 40)] = 0.0
  for _ in range(rng.integers(1, 4)):  # small dropouts
    y0, x0 = rng.integers(0, height), rng.integers(0, width)
    depth[y0:y0 + max(1, height // 30), x0:x0 + max(1, width // 30)] = 0.0

  semseg = label.reshape(height, width).astype(np.uint8)
  inst = instance.reshape(height, width)
  edge = np.zeros_like(inst, bool)  # void boundaries between surfaces, as in NYUD-v2
  edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
  edge[1:, :] |= inst[1:, :] != inst[:-1, :]
  semseg[edge & (semseg != NYU_CLASSES["wall"])] = 0

  # The hit face's normal points against the ray along the hit axis (world: x right, y up).
  normal_world = np.zeros((n, 3))
  normal_world[np.arange(n), axis_hit] = -np.sign(dirs[np.arange(n), axis_hit])
  normal_cam = normal_world @ (yaw @ pitch)  # world -> camera (x right, y up, z forward)
  normals = (normal_cam * np.array([1.0, -1.0, 1.0])).reshape(height, width, 3)  # y down
  normals[depth == 0] = 0.0  # normals come from depth: none where the sensor has no reading
  # One-pixel boundary lines, as the BSDS-style evaluation expects of ground truth.
  edge = morphology.thin(edge)
  return image, semseg, depth, normals.astype(np.float32), edge.astype(np.float32)


def _write_split(path: str, ids: Sequence[str]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(f"{i}\n" for i in ids))


def _ids(num_train: int, num_val: int) -> tuple[list[str], list[str]]:
  ids = [f"{i:06d}" for i in range(num_train + num_val)]
  return ids[:num_train], ids[num_train:]


def write_nyud(out_dir: str, num_train: int, num_val: int, seed: int, height: int = 480,
               width: int = 640) -> None:
  """Writes a synthetic NYUD_MT folder (images/, segmentation/, depth/, normals/, edge/, gt_sets/).

  Args:
    out_dir: the folder to create.
    num_train, num_val: number of frames per split.
    seed: the same seed writes the same files.
    height, width: frame size (the real one is 480x640).
  """
  train, val = _ids(num_train, num_val)
  for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  for index, image_id in enumerate(train + val):
    rng = np.random.default_rng([seed, index])
    image, semseg, depth, normals, edge = render_room(rng, height, width)
    Image.fromarray(image).save(os.path.join(out_dir, "images", f"{image_id}.jpg"),
                                quality=JPEG_QUALITY)
    Image.fromarray(semseg, mode="L").save(os.path.join(out_dir, "segmentation",
                                                        f"{image_id}.png"))
    np.save(os.path.join(out_dir, "depth", f"{image_id}.npy"), depth)
    np.save(os.path.join(out_dir, "normals", f"{image_id}.npy"), normals)
    np.save(os.path.join(out_dir, "edge", f"{image_id}.npy"), edge)
  _write_split(os.path.join(out_dir, "gt_sets", "train.txt"), train)
  _write_split(os.path.join(out_dir, "gt_sets", "val.txt"), val)


# ----------------------------------------------------------------------------- PASCAL_MT

VOC_CLASSES = {"background": 0, "bottle": 5, "car": 7, "person": 15, "pottedplant": 16,
               "tvmonitor": 20}
# PASCAL-Context (459-class LabelMap) ids of the synthetic scenes' classes.
CONTEXT_CLASSES = {"sky": 360, "ground": 189, "bottle": 34, "car": 59, "person": 284,
                   "pottedplant": 308, "tvmonitor": 427}
# Objects seen face-on (flat normals towards the camera); the others are rounded.
_FLAT_OBJECTS = ("car", "tvmonitor")
# Part name -> (part-class colour role). Names are PASCAL-Part's.
_PERSON_PARTS = ("head", "hair", "neck", "torso", "luarm", "ruarm", "llarm", "rlarm", "lhand",
                 "rhand", "luleg", "ruleg", "llleg", "rlleg", "lfoot", "rfoot")


def _draw_person(rng: np.random.Generator, cx: float, base: float, size: float):
  """Draw commands [(part name, kind, geometry, colour)] of a standing person."""
  skin = _jitter(rng, rng.choice([(235, 200, 170), (200, 150, 110), (140, 95, 65)]), 8)
  shirt = rng.uniform(30, 230, 3)
  trousers = _jitter(rng, rng.choice([(40, 50, 90), (60, 60, 60), (120, 100, 70)]), 10)
  shoes, hair = np.array([30.0, 25, 20]), _jitter(rng, (50, 35, 20), 10)
  s = size
  head_r = 0.065 * s
  neck_y = base - 0.84 * s
  hip_y = base - 0.47 * s
  sh_y = neck_y + 0.03 * s
  head_cy = neck_y - head_r * 1.05
  out = [
      ("torso", "rect", (cx - 0.11 * s, sh_y, cx + 0.11 * s, hip_y), shirt),
      ("neck", "rect", (cx - 0.03 * s, neck_y - 0.01 * s, cx + 0.03 * s, sh_y + 0.01 * s), skin),
      ("head", "ellipse", (cx - head_r, head_cy - head_r * 1.1, cx + head_r, head_cy + head_r),
       skin),
      ("hair", "ellipse", (cx - head_r, head_cy - head_r * 1.15, cx + head_r,
                           head_cy - head_r * 0.3), hair),
  ]
  swing = rng.uniform(-0.15, 0.15) * s
  for side, sign in (("l", -1), ("r", 1)):
    shoulder = (cx + sign * 0.13 * s, sh_y + 0.02 * s)
    elbow = (shoulder[0] + sign * 0.05 * s + swing * 0.3, shoulder[1] + 0.17 * s)
    wrist = (elbow[0] + sign * 0.02 * s + swing * 0.6, elbow[1] + 0.16 * s)
    hip = (cx + sign * 0.06 * s, hip_y)
    knee = (hip[0] + sign * 0.01 * s + swing * sign * 0.3, hip[1] + 0.23 * s)
    ankle = (knee[0] + sign * 0.01 * s, base - 0.03 * s)
    out += [
        (f"{side}uarm", "line", (shoulder, elbow, 0.055 * s), shirt),
        (f"{side}larm", "line", (elbow, wrist, 0.045 * s), skin),
        (f"{side}hand", "ellipse", (wrist[0] - 0.025 * s, wrist[1] - 0.01 * s,
                                    wrist[0] + 0.025 * s, wrist[1] + 0.045 * s), skin),
        (f"{side}uleg", "line", (hip, knee, 0.085 * s), trousers),
        (f"{side}lleg", "line", (knee, ankle, 0.065 * s), trousers * 0.85),
        (f"{side}foot", "rect", (ankle[0] - 0.035 * s + sign * 0.02 * s, ankle[1] - 0.01 * s,
                                 ankle[0] + 0.035 * s + sign * 0.02 * s, base), shoes),
    ]
  # Arms drawn last so that they cover the torso, as seen from the front.
  order = {"torso": 0, "neck": 0, "luleg": 1, "ruleg": 1, "llleg": 1, "rlleg": 1, "lfoot": 1,
           "rfoot": 1, "head": 2, "hair": 3}
  return sorted(out, key=lambda c: order.get(c[0], 4))


def _draw_object(rng: np.random.Generator, name: str, cx: float, base: float, size: float):
  """Draw commands [(part name or "", kind, geometry, colour)] of a non-person object."""
  s = size
  if name == "car":
    body = rng.uniform(40, 220, 3)
    w = 0.9 * s
    return [
        ("", "rect", (cx - w / 2, base - 0.32 * s, cx + w / 2, base - 0.1 * s), body),
        ("", "polygon", [(cx - w * 0.3, base - 0.32 * s), (cx - w * 0.18, base - 0.5 * s),
                         (cx + w * 0.2, base - 0.5 * s), (cx + w * 0.33, base - 0.32 * s)],
         body * 0.9),
        ("", "polygon", [(cx - w * 0.24, base - 0.34 * s), (cx - w * 0.16, base - 0.47 * s),
                         (cx + w * 0.18, base - 0.47 * s), (cx + w * 0.27, base - 0.34 * s)],
         np.array([150.0, 190, 220])),
        ("wheel_1", "ellipse", (cx - w * 0.38, base - 0.2 * s, cx - w * 0.18, base), np.full(3, 25.0)),
        ("wheel_2", "ellipse", (cx + w * 0.18, base - 0.2 * s, cx + w * 0.38, base), np.full(3, 25.0)),
    ]
  if name == "tvmonitor":
    w, h = 0.6 * s, 0.42 * s
    screen = _jitter(rng, (90, 160, 230), 30)
    return [("", "rect", (cx - 0.05 * s, base - 0.1 * s, cx + 0.05 * s, base), np.full(3, 40.0)),
            ("", "rect", (cx - w / 2, base - 0.1 * s - h, cx + w / 2, base - 0.1 * s),
             np.full(3, 20.0)),
            ("", "rect", (cx - w / 2 + 0.04 * s, base - 0.06 * s - h, cx + w / 2 - 0.04 * s,
                          base - 0.14 * s), screen)]
  if name == "bottle":
    glass = _jitter(rng, rng.choice([(40, 120, 50), (120, 70, 30), (60, 90, 160)]), 15)
    return [("", "rect", (cx - 0.08 * s, base - 0.45 * s, cx + 0.08 * s, base), glass),
            ("", "polygon", [(cx - 0.08 * s, base - 0.45 * s), (cx - 0.03 * s, base - 0.6 * s),
                             (cx + 0.03 * s, base - 0.6 * s), (cx + 0.08 * s, base - 0.45 * s)],
             glass),
            ("", "rect", (cx - 0.03 * s, base - 0.72 * s, cx + 0.03 * s, base - 0.6 * s), glass),
            ("", "rect", (cx - 0.035 * s, base - 0.75 * s, cx + 0.035 * s, base - 0.71 * s),
             np.array([200.0, 180, 40]))]
  if name == "pottedplant":
    pot = _jitter(rng, (190, 95, 60), 10)
    out = [("", "polygon", [(cx - 0.18 * s, base - 0.3 * s), (cx + 0.18 * s, base - 0.3 * s),
                            (cx + 0.13 * s, base), (cx - 0.13 * s, base)], pot)]
    for _ in range(6):
      lx, ly = cx + rng.uniform(-0.22, 0.22) * s, base - rng.uniform(0.4, 0.75) * s
      r = rng.uniform(0.1, 0.16) * s
      out.append(("", "ellipse", (lx - r, ly - r, lx + r, ly + r),
                  _jitter(rng, (50, 140, 50), 20)))
    return out
  raise ValueError(name)


def _paint(draws, image: ImageDraw.ImageDraw, index_layers: list[tuple[ImageDraw.ImageDraw, int]],
           part_layer: ImageDraw.ImageDraw | None, part_ids: dict[str, int]):
  """Paints draw commands into the image and, with constant values, into the label layers."""
  for part, kind, geometry, colour in draws:
    fill = tuple(int(c) for c in np.clip(colour, 0, 255))
    targets = [(image, fill)] + index_layers
    if part_layer is not None:
      targets.append((part_layer, part_ids.get(part, 0)))
    for layer, value in targets:
      if kind == "rect":
        layer.rectangle(geometry, fill=value)
      elif kind == "ellipse":
        layer.ellipse(geometry, fill=value)
      elif kind == "polygon":
        layer.polygon(geometry, fill=value)
      elif kind == "line":
        start, end, thickness = geometry
        layer.line([start, end], fill=value, width=max(1, int(round(thickness))))
        r = thickness / 2  # round joints
        for px, py in (start, end):
          layer.ellipse((px - r, py - r, px + r, py + r), fill=value)


def _mat_struct(objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]):
  """The PASCAL-Part `anno` struct: objects (class, class_ind, mask, parts (part_name, mask))."""
  obj_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
  part_dtype = [("part_name", "O"), ("mask", "O")]
  obj_array = np.zeros((1, len(objects)), dtype=obj_dtype)
  for i, (name, class_ind, mask, parts) in enumerate(objects):
    if parts:
      part_array = np.zeros((1, len(parts)), dtype=part_dtype)
      for j, (part_name, part_mask) in enumerate(parts):
        part_array[0, j] = (part_name, part_mask.astype(np.uint8))
    else:
      part_array = np.zeros((0, 0))
    obj_array[0, i] = (name, np.array([[class_ind]], np.uint8), mask.astype(np.uint8), part_array)
  anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
  anno[0, 0] = ("", obj_array)
  return anno


def _save_mat(path: str, variables: dict) -> None:
  """scipy.io.savemat with a fixed header text (scipy writes the time), so that a seed fixes bytes."""
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, variables)
  data = bytearray(buffer.getvalue())
  data[:116] = b"MATLAB 5.0 MAT-file, written by data_pipelines.synthetic".ljust(116)
  with open(path, "wb") as f:
    f.write(bytes(data))


def render_pascal(rng: np.random.Generator, height: int, width: int):
  """Renders one synthetic PASCAL image.

  Returns:
    image uint8 [H, W, 3], semseg uint8 [H, W] (0..20), saliency uint8 [H, W] (0..255), the
    objects of the `.mat` file [(class, class_ind, visible mask, [(part name, mask)])], the
    PASCAL-Context label map uint16 [H, W] and normals float32 [H, W, 3] (unit, camera x right /
    y down / z forward).
  """
  horizon = rng.uniform(0.35, 0.6) * height
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
  sky = np.array([120.0, 170, 230]) + rng.normal(0, 15, 3)
  ground = rng.choice([(90, 140, 60), (120, 115, 110), (170, 150, 110)]) + rng.normal(0, 10, 3)
  image = np.where((yy < horizon)[..., None],
                   sky * (0.8 + 0.2 * yy[..., None] / max(horizon, 1)),
                   ground * (0.85 + 0.15 * np.sin(xx * 0.3 + yy * 0.5)[..., None]))
  image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
  semseg = Image.new("L", (width, height), 0)
  instances = Image.new("L", (width, height), 0)
  parts = Image.new("L", (width, height), 0)
  draw_image, draw_sem = ImageDraw.Draw(image), ImageDraw.Draw(semseg)
  draw_inst, draw_parts = ImageDraw.Draw(instances), ImageDraw.Draw(parts)
  part_ids = {name: i + 1 for i, name in enumerate(_PERSON_PARTS)}

  specs = []  # (class name, centre x, base y, size), drawn far (small) to near (large)
  n_people = rng.choice([0, 1, 1, 2, 2, 3])
  names = ["person"] * n_people + [
      ["car", "tvmonitor", "bottle", "pottedplant"][rng.integers(4)]
      for _ in range(rng.integers(0 if n_people else 1, 3))]
  for name in names:
    size = rng.uniform(0.4, 0.8) * height
    if name != "person":
      size *= {"car": 0.8, "tvmonitor": 0.7, "bottle": 0.5, "pottedplant": 0.6}[name]
    base = min(height - 1.0, horizon + rng.uniform(0.3, 1.0) * (height - horizon))
    base = max(base, min(height - 1.0, 1.02 * size))  # keep heads inside the frame
    specs.append((name, rng.uniform(0.15, 0.85) * width, base, size))
  specs.sort(key=lambda s: s[2])  # lower on the ground = nearer = drawn later
  records = []
  for index, (name, cx, base, size) in enumerate(specs, start=1):
    class_ind = VOC_CLASSES[name]
    if name == "person":
      draws = _draw_person(rng, cx, base, size)
      _paint(draws, draw_image, [(draw_sem, class_ind), (draw_inst, index)], draw_parts, part_ids)
    else:
      draws = _draw_object(rng, name, cx, base, size)
      # Wheels are parts of cars in PASCAL-Part: they go to the .mat, never to the person map.
      _paint(draws, draw_image, [(draw_sem, class_ind), (draw_inst, index)], draw_parts, {})
    records.append((name, class_ind, index, [d[0] for d in draws if d[0]]))

  inst = np.asarray(instances)
  part_map = np.asarray(parts)
  objects = []
  salient = np.zeros((height, width), bool)
  for name, class_ind, index, part_names in records:
    visible = inst == index
    if not visible.any():
      continue
    salient |= visible
    obj_parts = []
    if name == "person":
      for part_name in dict.fromkeys(part_names):
        mask = visible & (part_map == part_ids[part_name])
        if mask.any():
          obj_parts.append((part_name, mask))
    else:  # non-person parts: only wheels, found by their colour-independent geometry
      dark = np.asarray(image.convert("L")) < 40
      for part_name in part_names:
        mask = visible & dark
        if mask.any():
          obj_parts.append((part_name, mask))
          break
    objects.append((name, class_ind, visible, obj_parts))

  pixels = np.asarray(image).astype(np.float64) + rng.normal(0, 3, (height, width, 3))
  image_arr = np.clip(pixels, 0, 255).astype(np.uint8)
  # Distilled saliency is soft at object borders.
  sal = Image.fromarray((salient * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))

  context = np.where(yy < horizon, CONTEXT_CLASSES["sky"], CONTEXT_CLASSES["ground"])
  normals = np.zeros((height, width, 3))
  normals[yy >= horizon] = (0.0, -1.0, 0.0)  # the ground faces up (y points down)
  normals[yy < horizon] = (0.0, 0.0, -1.0)
  for name, _, index, _ in records:
    visible = inst == index
    if not visible.any():
      continue
    context[visible] = CONTEXT_CLASSES[name]
    normals[visible] = _object_normals(visible, flat=name in _FLAT_OBJECTS)[visible]
  return (image_arr, np.asarray(semseg).copy(), np.asarray(sal).copy(), objects,
          context.astype(np.uint16), normals.astype(np.float32))


def _object_normals(mask: np.ndarray, flat: bool) -> np.ndarray:
  """Unit normals [H, W, 3] of an object seen from the front: a flat face (0, 0, -1), or a dome
  bulging towards the camera with height h = sqrt(R d) (d: distance to the mask's border, R its
  maximum), whose normal is (-dh/dx, -dh/dy, -1) normalised."""
  if flat:
    return np.broadcast_to(np.array([0.0, 0.0, -1.0]), (*mask.shape, 3)).copy()
  distance = ndimage.distance_transform_edt(mask)
  height = np.sqrt(distance * max(float(distance.max()), 1.0))
  dh_dy, dh_dx = np.gradient(height)
  normals = np.stack([-dh_dx, -dh_dy, -np.ones_like(height)], axis=-1)
  return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def _encode_normals_png(normals: np.ndarray) -> np.ndarray:
  """Unit normals -> uint8 RGB with component = 2 * value / 255 - 1 (the PASCAL_MT encoding)."""
  return np.clip(np.round((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_pascal(out_dir: str, num_train: int, num_val: int, seed: int, height: int = 375,
                 width: int = 500) -> None:
  """Writes a synthetic PASCAL_MT folder (JPEGImages/, ImageSets/Context/, semseg/, human_parts/,
  sal_distill/, normals_distill/, pascal-context/trainval/).

  Image sizes vary per image (up to `height` x `width`, down to 7/8 of it), as PASCAL's do. Half
  the semseg maps go to semseg/VOC12 (with 255 object outlines, as VOC has), the others to
  semseg/pascal-context.

  Args:
    out_dir: the folder to create.
    num_train, num_val: number of images per split.
    seed: the same seed writes the same files.
    height, width: the largest image size.
  """
  train, val = _ids(num_train, num_val)
  train = [f"2008_{i}" for i in train]
  val = [f"2009_{i}" for i in val]
  for sub in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context",
              "human_parts", "sal_distill", "normals_distill", "pascal-context/trainval"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  for index, image_id in enumerate(train + val):
    rng = np.random.default_rng([seed, index])
    h = height - int(rng.integers(0, height // 8 + 1))
    w = width - int(rng.integers(0, width // 8 + 1))
    image, semseg, sal, objects, context, normals = render_pascal(rng, h, w)
    Image.fromarray(image).save(os.path.join(out_dir, "JPEGImages", f"{image_id}.jpg"),
                                quality=JPEG_QUALITY)
    if index % 2 == 0:
      outline = np.zeros_like(semseg, bool)
      outline[:, 1:] |= semseg[:, 1:] != semseg[:, :-1]
      outline[1:, :] |= semseg[1:, :] != semseg[:-1, :]
      semseg = np.where(outline, 255, semseg).astype(np.uint8)
      sem_path = os.path.join(out_dir, "semseg", "VOC12", f"{image_id}.png")
    else:
      sem_path = os.path.join(out_dir, "semseg", "pascal-context", f"{image_id}.png")
    Image.fromarray(semseg, mode="L").save(sem_path)
    Image.fromarray(sal, mode="L").save(os.path.join(out_dir, "sal_distill", f"{image_id}.png"))
    _save_mat(os.path.join(out_dir, "human_parts", f"{image_id}.mat"),
              {"anno": _mat_struct(objects)})
    _save_mat(os.path.join(out_dir, "pascal-context", "trainval", f"{image_id}.mat"),
              {"LabelMap": context})
    Image.fromarray(_encode_normals_png(normals), mode="RGB").save(
        os.path.join(out_dir, "normals_distill", f"{image_id}.png"))
  _write_split(os.path.join(out_dir, "ImageSets", "Context", "train.txt"), train)
  _write_split(os.path.join(out_dir, "ImageSets", "Context", "val.txt"), val)


WRITERS = {"nyud": write_nyud, "pascal": write_pascal}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.synthetic",
      description="Writes a synthetic NYUD_MT or PASCAL_MT folder in the published layout.")
  parser.add_argument("--dataset", choices=sorted(WRITERS), required=True)
  parser.add_argument("--out", required=True, help="folder to write (created)")
  parser.add_argument("--num-train", type=int, default=64)
  parser.add_argument("--num-val", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--height", type=int, default=None,
                      help="image height (default: 480 for nyud, 375 for pascal)")
  parser.add_argument("--width", type=int, default=None,
                      help="image width (default: 640 for nyud, 500 for pascal)")
  args = parser.parse_args(argv)
  if args.num_train < 0 or args.num_val < 0:
    parser.error("--num-train and --num-val must be >= 0")
  sizes = {}
  if args.height is not None:
    sizes["height"] = args.height
  if args.width is not None:
    sizes["width"] = args.width
  if any(v < 16 for v in sizes.values()):
    parser.error("--height and --width must be at least 16")
  WRITERS[args.dataset](args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                        **sizes)
  print(f"wrote {args.num_train} train and {args.num_val} val {args.dataset} examples to "
        f"{args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
