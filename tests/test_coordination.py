"""The coordination service's client, reached in one place (iterfuse_jax/coordination.py), and
texts gathered through it from several processes (also used by the multi-process tests of
tests/test_train.py: each process's view of the workdir and its checkpoint listing)."""

import json
import types

import jax
import pytest
from jax._src import distributed

from iterfuse_jax import coordination
from tests import multiprocess


def test_one_process_has_no_client_and_gathers_its_own_text():
  assert coordination.client() is None
  assert coordination.gather_texts("listing", "mine") == ["mine"]


def test_a_jax_that_keeps_the_client_elsewhere_is_named(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed, "global_state", types.SimpleNamespace())
  with pytest.raises(RuntimeError, match=rf"jax {jax.__version__} does not keep the coordination "
                                         r"service's client at jax\._src\.distributed"):
    coordination.client()


def test_several_processes_without_a_client_say_to_initialize(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed, "global_state", types.SimpleNamespace(client=None))
  with pytest.raises(RuntimeError, match=r"call jax\.distributed\.initialize first"):
    coordination.client()


_GATHER = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
from iterfuse_jax import coordination
me = jax.process_index()
print(json.dumps([coordination.gather_texts("listing", f"first {me}"),
                  coordination.gather_texts("other", f"other {me}"),
                  coordination.gather_texts("listing", f"second {me}"),
                  coordination.has_key("iterfuse_jax/listing/1/0"),
                  coordination.has_key("iterfuse_jax/listing/2/0")]))
"""


def test_two_processes_gather_a_name_again_and_pair_up_by_round():
  processes = multiprocess.start(multiprocess.script_commands(_GATHER, 2))
  outputs = multiprocess.finish(processes, timeout=120)
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
    assert json.loads(out) == [["first 0", "first 1"], ["other 0", "other 1"],
                               ["second 0", "second 1"], True, False]
