"""Shared fixtures: tiny random DeepSeek-V2 checkpoints written by transformers itself.

Every test process simulates 8 CPU devices (set before JAX starts) so that sharding tests can
build real meshes; single-device tests simply use device 0. Nothing touches the network.
"""

import functools
import os
import shutil
import subprocess
import sys

# The tests run tiny shapes for a few steps, so compiling dominates their time: XLA:CPU's
# backend (LLVM) optimisation is turned down, which halves a tiny train step's compile
# (bench/accel.py --smoke's train stage: 51 -> 26 s) for slower code that tiny shapes do not
# feel, and its loop fusions are emitted by the elemental IR emitter instead of the MLIR fusion
# emitters, whose pipeline took over half of what remained (a DES-MoE test_methods run on idle
# cores: 11.0 -> 4.5 s of backend compile, 20.9 -> 10.0 CPU s). Numerics are unchanged: no
# flag enables fast-math, and the whole suite's references hold under them.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true "
                          "--xla_cpu_use_fusion_emitters=false")
# What a test's train.py / eval.py subprocess gets: one device (as a user's laptop), fast compile.
ONE_DEVICE_XLA_FLAGS = FAST_COMPILE_XLA_FLAGS
# The routed-expert dispatch for end-to-end runs that test something else (faults, resume,
# families, processes): `dense` compiles in about a quarter less CPU time than the CPU default
# `tiled` (a desmoe + fft + esft_token family run: 67 -> 49 CPU s) and gives the same numbers
# (tests/test_moe.py compares every impl). The default dispatch still runs end to end in
# tests/test_cli.py, tests/test_notebooks.py and CI's runtime stage (.ci/run).
E2E_MOE_IMPL = "dense"


def one_device_env(**extra) -> dict:
  """The environment of a test's train.py / eval.py subprocess: this checkout's package first on
  PYTHONPATH (whatever is installed), the hub offline, ONE_DEVICE_XLA_FLAGS, then `extra`."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
  env.update(XLA_FLAGS=ONE_DEVICE_XLA_FLAGS, **extra)
  return env

os.environ.setdefault("XLA_FLAGS",
                      f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_XLA_FLAGS}")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent JAX compilation cache for the whole run: the xdist workers and every train.py /
# eval.py subprocess a test starts inherit it through the environment, so a program that many
# tests compile (the tiny preset's train step, its evaluation, the export fold) is compiled once
# per run instead of once per test. The controller process, which loads this file before the
# workers start, makes a fresh directory and removes it at the end; runs never share one.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="desmoe_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# Named variants covering the architecture's switches (see test_model.py): overrides of
# desmoe_jax/families/deepseek_v2.py's TINY, a small DeepSeek-V2 with every feature of V2-Lite
# (MLA without q_lora, YaRN, one dense layer, shared + routed experts, greedy top-k).
VARIANTS = {
    "v2lite_like": {},
    "qlora_grouped": dict(q_lora_rank=12, rope_scaling=None, topk_method="group_limited_greedy",
                          n_group=4, topk_group=2, num_experts_per_tok=3,
                          routed_scaling_factor=2.5, first_k_dense_replace=2,
                          num_hidden_layers=4, n_shared_experts=2),
    "all_moe_yarn_mscale": dict(first_k_dense_replace=0, num_hidden_layers=2,
                                rope_scaling=dict(type="yarn", factor=8.0,
                                                  original_max_position_embeddings=32,
                                                  mscale=1.0, mscale_all_dim=0.5)),
    "bias_tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                      q_lora_rank=8, n_routed_experts=6, num_experts_per_tok=1),
}


def make_hf_model(path, seed=0, **overrides):
  """Writes a random transformers DeepseekV2ForCausalLM (float32) to `path`; returns the model:
  `make_family_model` for DeepSeek-V2."""
  return make_family_model("deepseek_v2", path, seed=seed, **overrides)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
  """Factory: name of a VARIANTS entry -> (path, torch model); built once per session."""
  cache = {}

  def get(name="v2lite_like"):
    if name not in cache:
      path = tmp_path_factory.mktemp(f"hf_{name}")
      cache[name] = (str(path), make_hf_model(str(path), **VARIANTS[name]))
    return cache[name]

  return get


def make_family_model(family: str, path, seed=0, **overrides):
  """Writes a random transformers model of `family` (its file's TINY kwargs, float32) to `path`;
  returns the model. Norms, biases and DeepSeek-V3's selection bias are randomised so that a
  wrong mapping cannot hide behind ones and zeros."""
  import torch
  import transformers

  from desmoe_jax.families import get_family

  fam = get_family(family)
  torch.manual_seed(seed)
  config = getattr(transformers, fam.HF_CONFIG)(**dict(fam.TINY, **overrides))
  model = getattr(transformers, fam.HF_ARCHITECTURE)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.add_(0.1 * torch.randn_like(b))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
  """Factory: family model_type -> (path, torch model); built once per session."""
  cache = {}

  def get(family):
    if family not in cache:
      path = tmp_path_factory.mktemp(f"family_{family}")
      cache[family] = (str(path), make_family_model(family, str(path)))
    return cache[family]

  return get


# ------------------------------------------------------------------ the pass@1 sandbox


@functools.lru_cache(maxsize=None)
def machine_can_isolate(user_namespace: bool = False) -> tuple[bool, str]:
  """(yes, how we know): whether this machine itself can create what the sandbox needs, asked
  of util-linux directly rather than of desmoe_jax/sandbox.py: new pid, mount, net, ipc and uts
  namespaces (inside a new user namespace when `user_namespace` or not root, as the sandbox
  does) in which a tmpfs can be mounted. Where it can, a sandbox that cannot isolate is a bug
  in the sandbox, not a property of the machine."""
  if not sys.platform.startswith("linux"):
    return False, f"namespaces need Linux, this is {sys.platform}"
  found = {name: shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin")
           for name in ("unshare", "mount", "bwrap", "true")}
  tries = []
  if found["unshare"] and found["mount"]:
    cmd = [found["unshare"], "--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc",
           "--uts", "--propagation", "private"]
    if user_namespace or os.geteuid() != 0:
      cmd += ["--user", "--map-root-user"]
    tries.append(cmd + ["--", found["mount"], "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/tmp"])
  if found["bwrap"] and found["true"]:  # e.g. a setuid bwrap where users get no namespaces
    cmd = [found["bwrap"], "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if user_namespace:
      cmd += ["--unshare-user"]
    tries.append(cmd + [found["true"]])
  if not tries:
    return False, "neither util-linux's unshare(1) and mount(8) nor bwrap is installed"
  failures = []
  for cmd in tries:
    shown = " ".join(os.path.basename(c) if c in found.values() else c for c in cmd)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "LANG": "C"})
    except (OSError, subprocess.TimeoutExpired) as e:
      failures.append(f"`{shown}` did not run ({e})")
      continue
    if proc.returncode == 0:
      return True, f"`{shown}` exits 0"
    err = proc.stderr.strip().splitlines()
    failures.append(f"`{shown}` exits {proc.returncode}" + (f": {err[-1]}" if err else ""))
  return False, "; ".join(failures)


@pytest.fixture(scope="session")
def sandbox_isolates() -> bool:
  """Whether the pass@1 sandbox isolates here. False only on a machine that genuinely cannot
  (not Linux, no unshare, no namespaces or mounts for this user). Where unshare(1) itself creates
  the namespaces and mounts a tmpfs in them (root on Linux, or a user with user namespaces: CI),
  a sandbox whose own setup fails is an error of every test that asked, never a skip: its
  escape tests cannot be skipped away on a machine that should run them."""
  from desmoe_jax import sandbox
  ok, reason = sandbox.isolation_status()
  if ok:
    return True
  can, how = machine_can_isolate()
  if can:
    pytest.fail(f"this machine can isolate ({how}), but desmoe_jax/sandbox.py cannot: {reason}",
                pytrace=False)
  return False


@pytest.fixture
def isolation(sandbox_isolates):
  """For a test that needs the sandbox: skipped where the machine cannot isolate (the reason
  names the sandbox's and util-linux's), an error where it can but the sandbox does not."""
  if not sandbox_isolates:
    from desmoe_jax import sandbox
    pytest.skip(f"this machine cannot isolate: {sandbox.isolation_status()[1]}; and "
                f"{machine_can_isolate()[1]}")


@pytest.fixture(scope="session")
def machine_isolation():
  """`machine_can_isolate`, for tests that ask about one way in (e.g. a user namespace)."""
  return machine_can_isolate
