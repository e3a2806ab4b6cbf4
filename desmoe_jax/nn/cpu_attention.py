"""Causal attention as one XLA:CPU custom call per direction (`attention_impl="blocked"` lowered
for CPU, float32): the C++ kernel in cpu_attention.cc, built on first use.

Why: on XLA:CPU the blocked attention is half of the tiny model's train step, and most of it is
XLA running thin products (contractions over head dims of 48 and 32) and elementwise passes over
score blocks in memory. The kernel keeps one 64 x 64 score tile in cache from the product to the
softmax to the next product, flash-attention style (the row's log-sum-exp kept for a backward
that recomputes the tile), with a register-tiled loop for the products (bench/RESULTS.md,
"sixth round").

Same semantics and, to float32 rounding, the same numbers as nn/blocked_attention.py (which is
what runs where this cannot: an accelerator, other dtypes or head dims, no C++ compiler). In a
program partitioned over several devices XLA's partitioner cannot split a custom call and gathers
its operands (correct, not fast: multi-device CPU is for tests here). The shared library is
compiled once per (source, jax version, compiler, CPU) into `$DESMOE_JAX_CACHE` (default
`~/.cache/desmoe_jax`) with the host's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`); if
that fails, `available()` says why and the XLA path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FWD, _BWD = "desmoe_causal_attention_fwd", "desmoe_causal_attention_bwd"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cache_dir() -> Path:
  return Path(os.environ.get("DESMOE_JAX_CACHE", Path.home() / ".cache" / "desmoe_jax"))


def _cpu_id() -> str:
  """What -march=native compiles for: the model name and flags of this host's CPU."""
  try:
    text = Path("/proc/cpuinfo").read_text()
    keep = [l for l in text.splitlines() if l.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(sorted(set(keep)))
  except OSError:
    return platform.processor() + platform.machine()


def _compiler_version(cxx: str) -> str:
  """`cxx --version` (an upgraded compiler at the same path rebuilds); "" if it cannot say."""
  try:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                          timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return ""


def build(cxx: str, cache_dir: Path) -> tuple[Path | None, str]:
  """(the shared library, "") or (None, why not). Compiled once under a hash of everything it
  depends on, into a temporary file renamed into place, so concurrent processes (pytest-xdist,
  several runs) never load a half-written library."""
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), jax.__version__.encode(), cxx.encode(),
               _compiler_version(cxx).encode(), " ".join(_FLAGS).encode(), _cpu_id().encode()):
    key.update(part)
  lib = Path(cache_dir) / f"cpu_attention-{key.hexdigest()[:16]}.so"
  if lib.exists():
    return lib, ""
  lib.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=lib.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    os.unlink(tmp)
    return None, f"{' '.join(cmd)} failed: {e}"
  if done.returncode != 0:
    os.unlink(tmp)
    return None, f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
  os.replace(tmp, lib)
  return lib, ""


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
  """(registered, why not), once per process."""
  cxx = _compiler()
  if cxx is None:
    return False, "no C++ compiler ($CXX, c++, g++ or clang++) on PATH"
  lib, why = build(cxx, _cache_dir())
  if lib is None:
    return False, why
  so = ctypes.cdll.LoadLibrary(str(lib))
  jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(so.DesmoeCausalAttentionFwd),
                              platform="cpu")
  jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(so.DesmoeCausalAttentionBwd),
                              platform="cpu")
  return True, ""


def available() -> tuple[bool, str]:
  """(usable, why not): the library built and registered (once per process)."""
  try:
    return _load()
  except Exception as e:  # a broken toolchain or cache must not stop training: XLA runs instead
    return False, f"{type(e).__name__}: {e}"


def supports(q_bshd, k_bshd, v_bshv, mask_b1qk) -> bool:
  """Whether this call can run the kernel: a CPU host (where the program may still be lowered
  for an accelerator: the caller picks per platform), float32, q and k of one shape, head dims
  multiples of 16 and S of 16, a [B or 1, 1, S, S] mask; and the library built."""
  b, s = q_bshd.shape[:2]
  ok = (jax.default_backend() == "cpu"
        and all(a.dtype == jnp.float32 for a in (q_bshd, k_bshd, v_bshv))
        and q_bshd.shape == k_bshd.shape and q_bshd.shape[:3] == v_bshv.shape[:3]
        and q_bshd.shape[-1] % 16 == 0 and v_bshv.shape[-1] % 16 == 0 and s % 16 == 0
        and mask_b1qk.ndim == 4 and mask_b1qk.shape[0] in (1, b)
        and mask_b1qk.shape[1:] == (1, s, s))
  if not ok:
    return False
  usable, why = available()
  if not usable:
    _warn_once(why)
  return usable


@functools.lru_cache(maxsize=None)
def _warn_once(why: str):
  warnings.warn(f"desmoe_jax: the CPU attention kernel is unavailable, XLA's blocked attention "
                f"runs instead ({why})", RuntimeWarning, stacklevel=3)


def causal_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale: float):
  """softmax(q k^T * scale, masked) v, [B, S, H, Dv], for a causal bool `mask_b1qk`
  [B or 1, 1, S, S]; call only where `supports(...)`."""
  mask = jnp.broadcast_to(mask_b1qk.astype(jnp.bool_), (q_bshd.shape[0],) + mask_b1qk.shape[1:])
  return _attention(q_bshd, k_bshd, v_bshv, mask, float(scale))


def _fwd_call(q, k, v, mask, scale):
  b, s, h, _ = q.shape
  out = jax.ShapeDtypeStruct(v.shape, jnp.float32)
  lse = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
  call = jax.ffi.ffi_call(_FWD, (out, lse), vmap_method="sequential")
  return call(q, k, v, mask, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
  return _fwd_call(q, k, v, mask, scale)[0]


def _fwd(q, k, v, mask, scale):
  out, lse = _fwd_call(q, k, v, mask, scale)
  return out, (q, k, v, mask, out, lse)


def _bwd(scale, res, g):
  q, k, v, mask, out, lse = res
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(_BWD, shapes, vmap_method="sequential")(q, k, v, mask, out, lse,
                                             g.astype(jnp.float32), scale=np.float32(scale))
  return dq, dk, dv, None


_attention.defvjp(_fwd, _bwd)
