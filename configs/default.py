"""Defaults shared by every experiment: IterFuse (IFB C) on NYUD-v2 with the paper's training.

Experiment files start from `get_config()` and change fields; the returned config is locked, so a
misspelt key in an experiment file or on the command line (`--config.model.n_iters=4`) is an error.
"""

import ml_collections

from data_pipelines.config import get_dataset_config

# Paper, Table 2: the single-task (STL) references that Delta_m is measured against.
PAPER_STL_REFERENCES = {
    "nyud": {"semseg": 35.0091, "depth": 0.6610},
    "pascal": {"semseg": 59.3427, "human_parts": 60.3365, "sal": 66.892},
}
TASK_LOSS_WEIGHTS = {"semseg": 1.0, "depth": 1.0, "human_parts": 2.0, "sal": 5.0,
                     "normals": 10.0, "edge": 50.0}


def get_model_config() -> ml_collections.ConfigDict:
  """The IterFuse network: HRNet18 (W18-Small-v2), TPIM with IFB C, n_iter 18, alpha 0.3."""
  return ml_collections.ConfigDict({
      "name": "iterfuse",
      "backbone": "w18_small_v2",
      "fuse_upsample": "bilinear",
      "task_channels": 270,
      "initial_blocks": 2,
      "dtype": "float32",
      # Conv / dense layers outside the backbone: "pytorch" (the survey code's PyTorch defaults,
      # U(+-1/sqrt(fan_in))) or "flax" (lecun-normal kernels, zero biases).
      "init": "pytorch",
      # A folder written by `python -m iterfuse_jax.convert_imagenet` ("" = random init).
      "pretrained": "",
      "tpim": {
          "use_ifb": True,
          "variant": "C",
          "n_iter": 18,
          "alpha_init": 0.3,
          "scale": 2,
          "qk_channels": 0,  # 0: d = task_channels // 2 (see configs/README.md)
          "ifb_impl": "materialized",
          # Co and V enter the materialized IFB's products in the model's dtype ("model":
          # bfloat16 under dtype="bfloat16", as PyTorch autocast) or "float32"; both accumulate
          # in float32.
          "ifb_products": "model",
          # The materialized IFB's backward: "stacked" (dCo as one product over all
          # iterations) or "autodiff" (JAX's derivative of the loop; the same values, slower).
          "ifb_gradient": "stacked",
      },
  })


def get_config(dataset: str = "nyud") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = get_dataset_config(dataset)
  config.model = get_model_config()

  config.batch_size = 8  # global, over all devices and hosts
  config.num_epochs = 100
  config.num_train_steps = -1  # > 0 overrides num_epochs (quick runs; the poly decay spans them)

  config.optimizer = ml_collections.ConfigDict({
      "name": "adam",  # "adam" or "sgd"
      "learning_rate": 1e-4,
      "weight_decay": 1e-4,  # L2 added to the gradient, as PyTorch's optimisers do
      "momentum": 0.9,  # sgd only
      "poly_power": 0.9,  # lr * (1 - epoch / num_epochs) ** poly_power, stepped per epoch
  })
  config.loss_weights = dict(TASK_LOSS_WEIGHTS)
  config.stl_references = PAPER_STL_REFERENCES[dataset]

  config.log_every_steps = 20
  # Evaluations: at the end of each of the last `eval_last_epochs` epochs (the survey code's
  # choice: it reports the best of those by Delta_m), every `eval_every_steps` steps (0: never,
  # -1: once per epoch), and always after the last step. metrics.json holds the last one,
  # metrics_best.json the best one (highest Delta_m).
  config.eval_every_steps = 0
  config.eval_last_epochs = 10
  config.checkpoint_every_steps = -1  # -1: once per epoch
  config.keep_checkpoints = 3
  # How predictions reach the original image size before scoring: "survey" (segmentation argmax
  # resized nearest, saliency probability resized linearly, as the survey code) or "logits"
  # (logits resized bilinearly, then decoded). See iterfuse_jax/eval_resizing.py.
  config.eval_resize = "survey"
  config.num_eval_images = 4  # prediction images written to TensorBoard at each eval
  config.num_devices = -1  # -1: all local devices
  config.profile_steps = 0  # > 0: trace that many steps with the JAX profiler after the first
  # True: bit-for-bit reruns and resumes on a GPU too, at some cost in speed (XLA's deterministic
  # kernels, no autotuning; see iterfuse_jax/determinism.py). A CPU run is deterministic anyway.
  config.deterministic = False
  # If set, training writes a synthetic dataset of this size to dataset.data_dir when it is absent.
  config.synthetic_data = ml_collections.ConfigDict({
      "enabled": False, "num_train": 64, "num_val": 16, "height": 96, "width": 128, "seed": 0})
  # Edge odsF after training (iterfuse_jax/boundary_eval.py): worker processes (-1: all cores),
  # matching distance as a fraction of the diagonal (0: the dataset's, NYUD 0.011 / PASCAL 0.0075).
  config.boundary_eval = ml_collections.ConfigDict({"num_workers": -1, "max_dist": 0.0})
  return config
