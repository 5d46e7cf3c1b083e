"""RunCheckpoints in a run of several JAX processes (`jax.distributed` on localhost)."""

import textwrap

import pytest

from tests import multiprocess

# Each process: the latest and the best checkpoint of the same step, as the training loop saves
# them when an evaluation step is also a checkpoint step and the best so far. Process 0's commit
# of the latest save is held back (a primary host on a slow filesystem), so its end-of-save
# barrier is still open in process 1 when process 1's main thread starts the best save.
_SAVE_BOTH = textwrap.dedent("""
    import sys, threading, time
    import jax, numpy as np
    coordinator, process_id, workdir = sys.argv[1], int(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    from orbax.checkpoint._src.futures import synchronization
    from iterfuse_jax import checkpoints

    slow_commits = []
    original_set = synchronization.MultihostSynchronizedValue.set
    def set_after_a_slow_commit(self, value):
      if value is False and process_id == 0:  # the background thread's "save finished"
        slow_commits.append(threading.current_thread().name)
        time.sleep(2)
      original_set(self, value)
    synchronization.MultihostSynchronizedValue.set = set_after_a_slow_commit

    replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)),
                                            jax.sharding.PartitionSpec())
    state = {"w": jax.make_array_from_process_local_data(replicated, np.arange(64.0))}
    run = checkpoints.RunCheckpoints(workdir, keep=2)
    for step in (1, 2):
      run.save(step, state, None)
      run.save_best(step, state, delta_m=float(step))
    run.close()
    assert process_id == 1 or slow_commits, "the slow commit was not simulated"
    print("saved", checkpoints.committed_steps(workdir + "/checkpoints"),
          checkpoints.committed_steps(workdir + "/best"), flush=True)
""")


@pytest.mark.slow
def test_two_processes_save_the_latest_and_the_best_checkpoint_of_a_step(tmp_path):
  """Both managers' barriers used the same keys: a best save started while the latest save's
  background commit waited at its barrier failed in one process ('Barrier
  ThreadSaveMultiHostValueHolder:set_value_start is already ongoing') and left the other
  waiting until JAX's coordination service aborted both (SIGABRT)."""
  processes = multiprocess.start(multiprocess.script_commands(_SAVE_BOTH, 2, str(tmp_path)),
                                 env={"JAX_PLATFORMS": "cpu"})
  outputs = multiprocess.finish(processes, timeout=120)
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-5000:]
    assert out.splitlines()[-1] == "saved [1, 2] [2]", out
