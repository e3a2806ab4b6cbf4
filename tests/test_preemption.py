"""The preemption guard: a signal becomes a flag the step loop reads (the end-to-end SIGTERM
run is in test_trainer); on multi-process runs JAX's preemption sync decides instead."""

import os
import signal

import jax
import pytest

from desmoe_jax import preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_sets_the_flag_second_stops_at_once(sig):
  # The handler the guard replaces: Python's own for SIGINT, whatever an earlier test in this
  # worker process installed (one that is not Python's would not raise KeyboardInterrupt).
  outer = signal.default_int_handler if sig == signal.SIGINT else signal.getsignal(sig)
  before = signal.signal(sig, outer)
  try:
    with preemption.PreemptionGuard() as guard:
      assert not guard.reached(3)
      os.kill(os.getpid(), sig)                # delivered to this (main) thread right away
      assert guard.reached(3) and guard.signal_name == sig.name
      if sig == signal.SIGINT:                 # Ctrl-C twice: Python's own KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
          os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is outer      # handlers restored after the run
  finally:
    signal.signal(sig, before)


def test_multi_process_runs_follow_the_jax_preemption_sync(monkeypatch):
  """With several processes the guard installs no handler (JAX's preemption notifier owns
  SIGTERM) and asks orbax's reached_preemption(step) at every step, as MaxText does."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  asked = []

  class Manager:
    def reached_preemption(self, step):
      asked.append(step)
      return step == 5

  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert signal.getsignal(signal.SIGTERM) is before
    assert [guard.reached(s, Manager()) for s in (4, 5)] == [False, True]
  assert asked == [4, 5] and guard.signal_name.startswith("preemption notice")
