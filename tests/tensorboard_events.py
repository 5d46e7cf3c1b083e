"""The summaries in a run's TensorBoard event files, read with tensorboard's own loader (no
TensorFlow needed), for tests to compare."""

import glob
import io
import pathlib

import numpy as np


def read(logdir: str | pathlib.Path, images: dict | None = None) -> list[tuple]:
  """(tag, plugin, step, number-or-None) of every summary in the event files under `logdir`.

  images: a dict that receives the decoded pictures, (tag, step) -> uint8 [N, H, W, 3].
  """
  # pylint: disable=g-import-not-at-top
  from PIL import Image
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util
  # pylint: enable=g-import-not-at-top
  records = []
  for path in sorted(glob.glob(str(pathlib.Path(logdir) / "**" / "events.out.tfevents.*"),
                               recursive=True)):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        number = None
        if plugin == "scalars" or value.HasField("simple_value"):
          number = (value.simple_value if value.HasField("simple_value")
                    else float(tensor_util.make_ndarray(value.tensor)))
        elif plugin == "images" and images is not None:
          pngs = tensor_util.make_ndarray(value.tensor)[2:]  # width, height, then the PNGs
          images[value.tag, event.step] = np.stack(
              [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs])
        records.append((value.tag, plugin, event.step, number))
  return records
