"""Preemption: a SIGTERM (TPU VM / Slurm / Kubernetes eviction notice) or SIGINT (Ctrl-C) stops
the run at the end of the current step with a committed checkpoint of that step, instead of
losing everything since the last periodic one.

Single process: `PreemptionGuard` replaces the SIGTERM and SIGINT handlers for the length of
the run. The handler only records the signal (nothing else is safe inside a signal handler, and
a half-written step must not be saved); the step loop asks `reached(step)` once per step, saves,
waits for the save and raises `errors.Preempted` (exit code 75). A second signal while that save
runs restores the previous handlers and delivers the signal again: Ctrl-C twice still stops at
once.

Multi-process: the processes must agree on the step they save, or their checkpoint collectives
deadlock. JAX's distributed runtime catches SIGTERM itself (its preemption notifier, installed by
`jax.distributed.initialize`) and runs a sync protocol that picks the first step every process
can still reach; orbax's `CheckpointManager.reached_preemption(step)` (JAX's
`multihost_utils.reached_preemption_sync_point`) returns True on every process at that same
step, which is how MaxText uses it. There the guard installs no handler of its own (it would
replace JAX's), and Ctrl-C keeps its default meaning.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax

log = logging.getLogger("desmoe_jax")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
  """Context manager: records SIGTERM/SIGINT (single process) so the step loop can stop cleanly.

  `reached(step, manager)`: whether to save and stop after `step`. `manager` is the run's
  `ocp.CheckpointManager`, asked on multi-process runs (every process must call this at every
  step, with the same steps).
  """

  def __init__(self):
    self.signal_name: str | None = None     # set by the handler
    self._previous: dict[int, object] = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    self._restore()
    return False

  def _restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signal_name is not None:   # second signal: stop now, as the previous handler would
      log.warning("%s again: stopping without waiting for the checkpoint", name)
      self._restore()
      os.kill(os.getpid(), signum)
      return
    self.signal_name = name
    log.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                "(send it again to stop at once)", name)

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def reached(self, step: int, manager=None) -> bool:
    if jax.process_count() > 1:
      if manager is not None and manager.reached_preemption(step):
        self.signal_name = self.signal_name or "preemption notice (JAX preemption sync)"
        return True
      return False
    return self.requested
