"""ATRC as a distillation baseline: genotypes, the context arithmetic, the network, its losses."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from iterfuse_jax import compare, losses, train
from iterfuse_jax import tasks as task_registry
from iterfuse_jax.models import atrc, build, initialization
from tests.models import test_baselines as tb

NYUD = ("semseg", "depth")
PASCAL = tb.PASCAL_TASKS
# Every context once on PASCAL's three tasks: label contexts on human_parts (t-label, its own
# probabilities) and on sal and human_parts as sources (s-label); cut pairs and a cut diagonal.
MIXED = {
    "semseg": {"semseg": "local", "human_parts": "slabel", "sal": "slabel"},
    "human_parts": {"semseg": "tlabel", "human_parts": "none", "sal": "global"},
    "sal": {"semseg": "global", "human_parts": "local", "sal": "none"},
}


# ----------------------------------------------------------------------------- genotypes


def test_genotype_accepts_names_codes_and_atrc_files_on_a_task_subset(tmp_path):
  assert atrc.normalize_genotype("local", NYUD) == {
      "semseg": {"semseg": "local", "depth": "local"},
      "depth": {"semseg": "local", "depth": "local"}}
  # ATRC's atrc_genotype.json: integer codes, searched on the full task set.
  full = ("semseg", "depth", "normals", "edge")
  codes = {t: {s: (i + 2 * j) % 5 for i, s in enumerate(full)} for j, t in enumerate(full)}
  path = tmp_path / "atrc_genotype.json"
  path.write_text(json.dumps({"data": codes, "step": 40000}))
  genotype = build.load_atrc_genotype(str(path), NYUD)
  assert genotype == {"semseg": {"semseg": "none", "depth": "global"},
                      "depth": {"semseg": "local", "depth": "tlabel"}}
  # As a run's config.json keeps it: JSON text of the names.
  assert build.load_atrc_genotype(json.dumps(genotype), NYUD) == genotype
  assert atrc.aux_tasks(genotype, NYUD) == ("depth",)
  assert atrc.aux_tasks(atrc.normalize_genotype(MIXED, PASCAL), PASCAL) == ("human_parts", "sal")


@pytest.mark.parametrize("value, match", [
    ("everywhere", "neither a context"),
    ('{"semseg": {"semseg": 1, "depth": 1}}', "no row for target task 'depth'"),
    ('{"semseg": {"semseg": 1, "depth": 1}, "depth": {"semseg": 1}}',
     "row 'depth' has no entry for source task 'depth'"),
    ('{"semseg": {"semseg": 5, "depth": 0}, "depth": {"semseg": 1, "depth": 1}}',
     r"\['semseg'\]\['semseg'\] = 5"),
    ('{"semseg": {"semseg": "nearby", "depth": 0}, "depth": {"semseg": 1, "depth": 1}}',
     "'nearby': expected one of"),
    ('{"semseg": ', "not valid JSON"),
])
def test_bad_genotypes_say_what_is_wrong(value, match):
  with pytest.raises(ValueError, match=match):
    build.load_atrc_genotype(value, NYUD)


def test_bad_genotype_file_is_named(tmp_path):
  path = tmp_path / "genotype.json"
  path.write_text('{"data": {"semseg": {"semseg": 1, "depth": 1}}}')
  with pytest.raises(ValueError, match=f"ATRC genotype file {path}: .*no row for target task "
                                       "'depth'"):
    build.load_atrc_genotype(str(path), NYUD)


def test_label_contexts_over_normals_are_refused_by_name():
  assert [task_registry.aux_num_classes(t, "nyud") for t in ("semseg", "depth", "edge")] == [
      40, task_registry.AUX_DEPTH_BINS, 2]
  assert task_registry.aux_num_classes("sal", "pascal") == 2
  with pytest.raises(ValueError, match="'normals' has no auxiliary label prediction"):
    task_registry.aux_num_classes("normals", "nyud")


# ----------------------------------------------------------------------------- arithmetic


def test_local_window_attention_matches_a_direct_loop():
  rng = np.random.default_rng(0)
  b, h, w, d, c, k = 1, 5, 6, 3, 2, 3
  q, key, v = (rng.normal(size=(b, h, w, n)).astype(np.float32) for n in (d, d, c))
  got = np.asarray(atrc.local_window_attention(jnp.asarray(q), jnp.asarray(key),
                                               jnp.asarray(v), k))
  r = k // 2
  want = np.zeros((b, h, w, c))
  for y in range(h):
    for x in range(w):
      logits, values = [], []
      for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
          inside = 0 <= y + dy < h and 0 <= x + dx < w
          # Off the map: logit 0 and no value (ATRC's kernels).
          logits.append(q[0, y, x] @ key[0, y + dy, x + dx] if inside else 0.0)
          values.append(v[0, y + dy, x + dx] if inside else np.zeros(c))
      p = np.exp(np.array(logits) / np.sqrt(d))
      want[0, y, x] = (p / p.sum()) @ np.array(values)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="kernel_size must be odd"):
    atrc.local_window_attention(jnp.asarray(q), jnp.asarray(key), jnp.asarray(v), 4)


def test_global_linear_attention_is_normalised_dot_product_attention():
  rng = np.random.default_rng(1)
  q, k = (rng.uniform(0.1, 2.0, size=(2, n, 4)) for n in (5, 7))
  v = rng.normal(size=(2, 7, 3))
  got = np.asarray(atrc.global_linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
  affinity = np.einsum("bmd,bnd->bmn", q, k)
  want = np.einsum("bmn,bnc->bmc", affinity / affinity.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_class_pool_weights_features_by_each_class_spatial_distribution():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 3, 4)), jnp.float32)
  probs = atrc.spatial_probabilities(logits)  # [1, 6, 4]
  np.testing.assert_allclose(np.asarray(probs.sum(axis=1)), 1.0, rtol=1e-6)
  features = jnp.arange(12, dtype=jnp.float32).reshape(1, 6, 2)
  pooled = np.asarray(atrc.class_pool(features, probs))
  np.testing.assert_allclose(pooled[0, 1], np.asarray(probs[0, :, 1] @ features[0]), rtol=1e-6)


# ----------------------------------------------------------------------------- the module


def _distillation(genotype, tasks, channels=6):
  return atrc.ATRCDistillation(tasks, channels, atrc.normalize_genotype(genotype, tasks))


def _features_and_probs(tasks, seed=0, channels=6):
  rng = np.random.default_rng(seed)
  feats = {t: jnp.asarray(rng.normal(size=(2, 4, 5, channels)), jnp.float32) for t in tasks}
  probs = {t: atrc.spatial_probabilities(jnp.asarray(rng.normal(size=(2, 4, 5, 3)), jnp.float32))
           for t in tasks}
  return feats, probs


def test_atrc_starts_as_if_every_pair_were_cut_and_then_mixes_sources():
  module = _distillation(MIXED, PASCAL)
  feats, probs = _features_and_probs(PASCAL)
  variables = module.init(tb.key(0), feats, probs)
  params = variables["params"]
  for target in PASCAL:
    bn = params[f"project_{target}"]["bn"]
    assert not np.any(np.asarray(bn["scale"])) and not np.any(np.asarray(bn["bias"]))
  assert sorted(k for k in params if k.startswith("context_")) == sorted(
      f"context_{s}_to_{t}" for t in PASCAL for s in PASCAL if MIXED[t][s] != "none")
  # New source features, not shifted ones: the projections' BatchNorm removes a shift.
  other = dict(feats, human_parts=_features_and_probs(PASCAL, seed=1)[0]["human_parts"])
  other_probs = dict(probs, sal=probs["sal"][:, ::-1])

  def run(p, f, pr):
    return module.apply({**variables, "params": p}, f, pr, train=True, mutable=["batch_stats"])[0]

  before, after = run(params, feats, probs), run(params, other, other_probs)
  for target in ("semseg", "sal"):  # at initialisation nothing flows in from the sources
    np.testing.assert_allclose(np.asarray(before[target]), np.asarray(after[target]), atol=1e-6)
  opened = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ones_like(x) if "project_" in jax.tree_util.keystr(path) and
      jax.tree_util.keystr(path).endswith("['scale']") else x, params)
  changed = run(opened, other, other_probs)
  for target in ("semseg", "sal"):
    assert not np.allclose(np.asarray(run(opened, feats, probs)[target]),
                           np.asarray(changed[target]), atol=1e-4)


def test_label_contexts_without_probabilities_are_named():
  module = _distillation(MIXED, PASCAL)
  feats, probs = _features_and_probs(PASCAL)
  with pytest.raises(ValueError, match=r"probabilities of \['sal'\]"):
    module.init(tb.key(0), feats, {"human_parts": probs["human_parts"]})


def test_pytorch_init_keeps_the_context_blocks_xavier_draw():
  module = _distillation("global", NYUD)
  feats, probs = _features_and_probs(NYUD)
  params = module.init(tb.key(0), feats, probs)["params"]
  redrawn = initialization.initialize_params(params, jax.random.key(1), "pytorch")
  for name in params:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[name]),
                                                   jax.tree.leaves(redrawn[name])))
    assert same == name.startswith("context_"), name


def test_channel_dropout_zeroes_whole_channels_of_an_image_in_training_only():
  genotype = atrc.normalize_genotype("global", NYUD)
  plain = atrc.ATRCDistillation(NYUD, 16, genotype)
  dropping = atrc.ATRCDistillation(NYUD, 16, genotype, dropout_rate=0.5)
  feats, probs = _features_and_probs(NYUD, channels=16)
  variables = plain.init(tb.key(0), feats, probs)
  assert jax.tree.structure(dropping.init(tb.key(0), feats, probs)) == jax.tree.structure(
      variables)

  def train_mode(module, rng):
    return module.apply(variables, feats, probs, train=True, mutable=["batch_stats"],
                        rngs={"dropout": rng})[0]

  reference, dropped = train_mode(plain, tb.key(1)), train_mode(dropping, tb.key(1))
  for task in NYUD:
    ref, out = np.asarray(reference[task]), np.asarray(dropped[task])
    live = np.abs(ref).max(axis=(1, 2)) > 0  # [B, C]: channels with any non-zero value
    kept = np.abs(out).max(axis=(1, 2)) > 0
    assert live.all()
    # Each channel of each image is either zero everywhere or the reference over 1 - p.
    np.testing.assert_allclose(out, 2.0 * ref * kept[:, None, None, :], rtol=1e-6, atol=1e-6)
    assert 0.2 < 1.0 - kept.mean() < 0.8, kept
    assert not np.array_equal(kept[0], kept[1])  # a mask per image
  other = train_mode(dropping, tb.key(2))
  assert not np.array_equal(np.asarray(other["semseg"]) != 0, np.asarray(dropped["semseg"]) != 0)
  # Evaluation draws nothing and needs no rng.
  for task, out in dropping.apply(variables, feats, probs, train=False).items():
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(plain.apply(variables, feats, probs, train=False)[task]))


@pytest.mark.parametrize("rate", [0.05, -0.1, 1.0])
def test_dropout_rate_is_checked_when_the_model_is_built(rate):
  config = tb.row_config("nyud", "atrc")
  assert config.model.atrc.dropout_rate == atrc.DROPOUT_RATE == 0.05  # ATRC's
  config.model.atrc.dropout_rate = rate
  if rate == 0.05:
    assert tb.build_tiny(config).distillation.dropout_rate == 0.05
  else:
    with pytest.raises(ValueError, match=r"model.atrc.dropout_rate = .*expected a number in"):
      tb.build_tiny(config)


def test_train_step_draws_dropout_masks_from_the_seed_and_the_step():
  """The real train step gives ATRC's dropout a key of (seed, step): the same step gives the same
  loss, another step other masks; a model without dropout gives the same loss at every step."""
  batch = tb.fake_batch("nyud", NYUD)
  losses_by_rate = {}
  for rate in (0.5, 0.0):
    config = tb.row_config("nyud", "atrc")
    config.model.atrc.dropout_rate = rate
    model = tb.build_tiny(config)
    variables = model.init(tb.key(0), batch["image"])
    state = train.TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
        tx=optax.adam(1e-3), nonfinite_step=jnp.array(-1, jnp.int32))
    state = state.replace(step=jnp.asarray(0, jnp.int32))
    step = jax.jit(functools.partial(train.train_step, tasks=NYUD,
                                     loss_weights=dict(config.loss_weights),
                                     schedule=lambda _: 1e-3, seed=3))
    step = step.lower(state, batch).compile(compiler_options=tb.FAST_COMPILE)
    losses_by_rate[rate] = [
        float(step(state.replace(step=jnp.asarray(s, jnp.int32)), batch)[1]["loss/total"])
        for s in (0, 0, 1)]
  first, again, later = losses_by_rate[0.5]
  assert first == again and first != later
  assert len(set(losses_by_rate[0.0])) == 1
  assert not np.array_equal(jax.random.key_data(train.dropout_key(3, 0)),
                            jax.random.key_data(train.dropout_key(4, 0)))


# ----------------------------------------------------------------------------- network + loss


def _atrc_config(dataset, genotype):
  config = tb.row_config(dataset, "atrc")
  config.model.atrc.genotype = json.dumps(genotype)
  return config


def test_atrc_network_trains_every_parameter_but_the_closed_contexts():
  """One real train step: the aux heads learn from their losses, every layer but those behind
  the zero-initialised projections gets a gradient, BN statistics move."""
  config = _atrc_config("pascal", MIXED)
  tasks = tuple(config.dataset.tasks)
  model = tb.build_tiny(config)
  assert type(model).__name__ == "MultiTaskDenseNet"
  assert type(model.distillation).__name__ == "ATRCModule"
  batch = tb.fake_batch("pascal", tasks)
  step = jax.jit(tb.train_and_eval_fn(model, tasks, dict(config.loss_weights)))
  loss, grads, train_out, eval_out, variables, updates = step.lower(batch).compile(
      compiler_options=tb.FAST_COMPILE)(batch)
  assert np.isfinite(float(loss)) and float(loss) > 0
  for out in (train_out, eval_out):
    assert set(out) == {"initial", "aux", "final"}
    assert {t: v.shape[-1] for t, v in out["aux"].items()} == {"human_parts": 7, "sal": 2}
    for level in out.values():
      assert all(np.all(np.isfinite(np.asarray(x))) for x in level.values())
  flat = tb._flat(grads)
  dead = {n for n, g in flat.items() if not np.any(np.asarray(g))}
  # Behind the projections' zero BN scale: the context blocks and the projections' kernels;
  # the scales themselves learn and open the contexts.
  closed = {n for n in flat if n.startswith("distillation/context_") or
            (n.startswith("distillation/project_") and n.endswith("/conv/kernel"))}
  assert dead == closed, sorted(dead ^ closed)
  assert any(n.startswith("distillation/aux_conv_sal/") for n in flat)
  assert not any(n.startswith("distillation/aux_") for n in dead)
  _, parts = losses.multitask_loss(train_out, batch, tasks, dict(config.loss_weights))
  assert {"aux/human_parts", "aux/sal"} <= set(parts) and "aux/semseg" not in parts
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(updates["batch_stats"]),
                                                 jax.tree.leaves(variables["batch_stats"]))]
  assert moved and all(moved)


def test_aux_heads_do_not_train_the_backbone():
  config = _atrc_config("nyud", {"semseg": {"semseg": "none", "depth": "none"},
                                 "depth": {"semseg": "tlabel", "depth": "none"}})
  model = tb.build_tiny(config)
  batch = tb.fake_batch("nyud", NYUD)
  variables = model.init(tb.key(0), batch["image"])

  def aux_only(params):
    out, _ = model.apply({**variables, "params": params}, batch["image"], train=True,
                         mutable=["batch_stats"], rngs={"dropout": tb.key(1)})
    return losses.aux_loss("depth", out["aux"]["depth"], batch["depth"])

  grads = tb._flat(jax.grad(aux_only)(variables["params"]))
  assert any(np.any(np.asarray(g)) for n, g in grads.items() if n.startswith("distillation/aux_"))
  assert not any(np.any(np.asarray(g)) for n, g in grads.items() if n.startswith("backbone/"))


def test_depth_bins_are_uniform_in_log_depth_and_ignore_invalid_depth():
  lo, hi = task_registry.AUX_DEPTH_RANGE
  n = task_registry.AUX_DEPTH_BINS
  depth = jnp.asarray([[[lo, hi, 0.1, 50.0, 0.0, 255.0, lo * (hi / lo) ** 0.5 * 1.001]]])
  np.testing.assert_array_equal(np.asarray(losses.depth_bins(depth)),
                                [[[0, n - 1, 0, n - 1, 255, 255, n // 2]]])


def test_two_class_cross_entropy_weights_classes_and_divides_by_valid_pixels():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 2, 3, 2)), jnp.float32)
  labels = jnp.asarray([[[1, 0, 0], [0, 255, 1]]])
  lp = np.asarray(jax.nn.log_softmax(logits, -1))[0]
  pos = -(lp[0, 0, 1] + lp[1, 2, 1])
  neg = -(lp[0, 1, 0] + lp[0, 2, 0] + lp[1, 0, 0])
  w = 3 / 5  # balanced: the fraction of negatives among the valid pixels
  np.testing.assert_allclose(float(losses.two_class_cross_entropy(logits, labels, None)),
                             (w * pos + (1 - w) * neg) / 5, rtol=1e-5)
  np.testing.assert_allclose(float(losses.aux_loss("edge", logits, labels)),
                             (0.95 * pos + 0.05 * neg) / 5, rtol=1e-5)
  assert float(losses.two_class_cross_entropy(logits, jnp.full((1, 2, 3), 255), None)) == 0.0


def test_aux_level_is_supervised_only_for_the_tasks_it_holds():
  rng = np.random.default_rng(4)
  batch = tb.fake_batch("nyud", NYUD)
  final = {"semseg": jnp.asarray(rng.normal(size=(2, 32, 32, 40)), jnp.float32),
           "depth": jnp.asarray(rng.uniform(size=(2, 32, 32, 1)), jnp.float32)}
  aux = {"depth": jnp.asarray(rng.normal(size=(2, 16, 16, 40)), jnp.float32)}
  total, parts = losses.multitask_loss({"final": final, "aux": aux}, batch, NYUD)
  assert set(parts) == {"final/semseg", "final/depth", "aux/depth", "total"}
  np.testing.assert_allclose(float(total), float(parts["final/semseg"] + parts["final/depth"] +
                                                 parts["aux/depth"]), rtol=1e-6)
  with pytest.raises(ValueError, match=r"predictions for \['sal'\]"):
    losses.multitask_loss({"final": final, "aux": {"sal": aux["depth"]}}, batch, NYUD)


def test_comparison_table_names_the_contexts():
  for genotype, want in (("global", "contexts: all global"),
                         (json.dumps({"semseg": {"semseg": 0, "depth": 4},
                                      "depth": {"semseg": 1, "depth": 2}}),
                          "SemSeg ← SemSeg none, Depth slabel; Depth ← SemSeg global, "
                          "Depth local")):
    config = ml_collections.ConfigDict({"model": {"name": "atrc", "atrc": {"genotype": genotype}},
                                        "dataset": {"name": "nyud", "tasks": list(NYUD)}})
    run = compare.Run(pathlib.Path("/nonexistent"), config, {})
    assert run.title() == "ATRC" and run.settings() == want


def test_full_task_sets_get_edge_and_depth_label_heads_and_refuse_normals_ones():
  full = task_registry.FULL_TASKS["nyud"]
  genotype = {t: {s: "global" if "normals" in (s, t) else "none" for s in full} for t in full}
  genotype["edge"]["edge"] = "tlabel"
  genotype["semseg"]["depth"] = "slabel"
  config = tb.row_config("nyud", "full_atrc")
  config.model.atrc.genotype = json.dumps(genotype)
  model = tb.build_tiny(config)
  images = jax.ShapeDtypeStruct((1, *tb.SIZE, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(tb.key(0), x), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert {t: v.shape[-1] for t, v in out["aux"].items()} == {
      "depth": task_registry.AUX_DEPTH_BINS, "edge": 2}
  assert out["final"]["normals"].shape == (1, *tb.SIZE, 3)
  genotype["normals"]["depth"] = "tlabel"
  config.model.atrc.genotype = json.dumps(genotype)
  with pytest.raises(ValueError, match="'normals' has no auxiliary label prediction"):
    tb.build_tiny(config)
