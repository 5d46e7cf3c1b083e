"""The coordination service's client, reached in one place (iterfuse_jax/coordination.py); texts
gathered from several processes are tested by the multi-process tests (tests/test_train.py: each
process's checkpoint listing)."""

import types

import jax
import pytest
from jax._src import distributed

from iterfuse_jax import coordination


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
