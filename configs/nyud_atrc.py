"""ATRC (Table 2a) on NYUD-v2 (semseg + depth).

IterFuse's network with the TPIM replaced by ATRC's adaptive task-relational context: one context
(global, local, t-label, s-label or none) per ordered task pair, picked by ATRC's architecture
search. The paper used ATRC's published search result for HRNet18 on NYUD-v2; ATRC's code ships
it as an `atrc_genotype.json`, which this project does not have. Pass it with

    --config.model.atrc.genotype=/path/to/atrc_genotype.json

(tasks beyond semseg and depth in that file are ignored; its normals-related label contexts
cannot be used, see `iterfuse_jax.tasks.aux_num_classes`). Without it, every pair uses the
global context: ATRC's own "global relational context" baseline, not its searched model.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.name = "atrc"
  config.model.atrc = {"genotype": "global", "context_channels": 0, "kernel_size": 9,
                       "dropout_rate": 0.05}
  config.lock()
  return config
