"""ImageNet normalisation constants of the input pipeline, importable without grain or tfds.

`transforms.normalize_image` applies them; `iterfuse_jax.inference` normalises user images with
the same numbers and must import on machines without the data-pipeline libraries (a GPU image).
"""

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
