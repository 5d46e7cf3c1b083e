"""Any row of the comparison at the demo's size: synthetic data, small model, minutes on a CPU.

  python launch.py --config configs/demo_rows.py:stl --workdir /tmp/demo/stl
  python launch.py --config configs/demo_rows.py:pascal_padnet --workdir /tmp/demo/pascal_padnet
  python -m iterfuse_jax.compare /tmp/demo/* --out /tmp/demo/table.md

The argument is a row ("stl", "mtl", "padnet", "mtinet", "densemtl", "atrc", "noifb", "ifbA",
"ifbB", "ifbC"), optionally prefixed by the dataset ("pascal_ifbC"; default nyud) and "full_" for the
survey's full task sets ("nyud_full_ifbC", "pascal_full_stl"; rows stl, mtl, padnet, mtinet,
densemtl, atrc, ifbC). The row's model and tasks come from `configs/<dataset>_[full_]<row>.py`;
data, sizes, model width and training length come from
`configs/demo.py`. Every row trains with the demo's optimiser (Adam, lr 2e-3), also STL: at this
length the paper's STL recipe (SGD, lr 1e-4 on NYUD-v2) would barely move, and one optimiser keeps
the demo rows comparable. STL keeps its loss weights of 1.
"""

import importlib

from configs import demo

ROWS = ("stl", "mtl", "padnet", "mtinet", "densemtl", "atrc", "noifb", "ifbA", "ifbB", "ifbC")
FULL_ROWS = ("stl", "mtl", "padnet", "mtinet", "densemtl", "atrc", "ifbC")


def get_config(arg: str = "ifbC"):
  prefix, _, row = arg.rpartition("_")
  dataset, _, full = (prefix or "nyud").partition("_")
  rows = FULL_ROWS if full else ROWS
  if row not in rows or dataset not in ("nyud", "pascal") or full not in ("", "full"):
    raise ValueError(f"configs/demo_rows.py: unknown row {arg!r}; expected [nyud_|pascal_]ROW "
                     f"with ROW one of {list(ROWS)}, or nyud_full_ROW / pascal_full_ROW with ROW "
                     f"one of {list(FULL_ROWS)}")
  config = importlib.import_module(f"configs.{prefix or dataset}_{row}").get_config()
  small = demo.get_config()
  config.unlock()
  tasks = config.dataset.tasks
  if dataset == small.dataset.name:
    config.dataset = small.dataset
    config.dataset.tasks = tasks
  else:  # same sizes and synthetic data for the other dataset
    for key in ("data_dir", "train_size", "eval_size", "eval_label_size"):
      config.dataset[key] = small.dataset[key]
  config.synthetic_data = small.synthetic_data
  config.model.task_channels = small.model.task_channels
  config.model.initial_blocks = small.model.initial_blocks
  config.optimizer = small.optimizer
  for key in ("batch_size", "num_epochs", "num_train_steps", "eval_every_steps",
              "eval_last_epochs", "checkpoint_every_steps", "log_every_steps"):
    config[key] = small[key]
  config.lock()
  return config
