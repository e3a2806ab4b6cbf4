"""The state a run trains: the model prepared for its method (ALR, DES-MoE state, masks),
sharded over the mesh, split into a graph and its arrays, with the optimizer state laid out
like them. `build_train_state` is the one place this is set up: the trainer (real weights),
eval.py (`evaluate.load_run_model`, no optimizer) and scripts/memory_plan.py (abstract arrays)
all call it.

ESFT's expert selection and the oracle DGES control (`dges.exclude_general_top`) run on the
prepared model before it is split (`select_experts`): they score experts on data.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax import data as data_lib
from desmoe_jax import esft as esft_lib
from desmoe_jax import optim
from desmoe_jax import sharding as sharding_lib
from desmoe_jax import specialization
from desmoe_jax.errors import ConfigError
from desmoe_jax.methods import MethodConfig, prepare_model
from desmoe_jax.optim import OptimConfig
from desmoe_jax.train_config import method_config, optim_config

log = logging.getLogger("desmoe_jax")


@dataclasses.dataclass
class TrainState:
  """A run's model and optimizer, split and laid out (arrays, or sharded ShapeDtypeStructs when
  built abstract). `opt_state` / `opt_shardings` are None when built without the optimizer,
  the shardings None without a mesh."""
  method_cfg: MethodConfig
  optim_cfg: OptimConfig
  graphdef: Any
  state: Any                # nnx.State: parameters + DES-MoE state
  opt_state: Any
  state_shardings: Any
  opt_shardings: Any


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def build_train_state(config, make_model: Callable[[], nnx.Module], mesh=None, *,
                      optimizer: bool = True, abstract: bool = False,
                      select: Callable[[nnx.Module, MethodConfig], None] | None = None,
                      domains: int | None = None) -> TrainState:
  """The train state of `config` for the model `make_model()` builds (loaded weights, or an
  initialised model), prepared for the method (`methods.prepare_model`). `select(model,
  method_cfg)`: expert selection on the prepared model (`select_experts`). With `mesh`, the
  model is sharded over it and the state's shardings are given; `optimizer`: the optimizer
  state is initialised, laid out like the parameters; `abstract`: nothing is computed, the
  arrays are sharded ShapeDtypeStructs (a memory plan). `domains`: the number of domains D
  when the config does not say it (data.discover_domains="auto": the run's clusters)."""
  mc, oc = method_config(config, domains), optim_config(config)

  def prepared():
    model = make_model()
    prepare_model(model, mc, seed=config.seed)
    return model

  model = nnx.eval_shape(prepared) if abstract else prepared()
  if select is not None:
    select(model, mc)
  if mesh is not None and not abstract:
    sharding_lib.shard_model(model, mesh)
  graphdef, state = nnx.split(model)
  if mesh is None:
    return TrainState(mc, oc, graphdef, state, None, None, None)
  state_sh = sharding_lib.state_shardings(state, mesh)
  if not optimizer:
    return TrainState(mc, oc, graphdef, state, None, state_sh, None)
  opt_sh = optim.optimizer_shardings(mc, oc, state, mesh)
  if abstract:
    opt = jax.eval_shape(lambda ms: optim.init_optimizer(mc, oc, ms), state)
    return TrainState(mc, oc, graphdef, with_shardings(state, state_sh),
                      with_shardings(opt, opt_sh), state_sh, opt_sh)
  opt = jax.jit(lambda ms: optim.init_optimizer(mc, oc, ms), out_shardings=opt_sh)(state)
  return TrainState(mc, oc, graphdef, state, opt, state_sh, opt_sh)


def select_experts(config, tokenizer, train_specs, place=jnp.asarray):
  """The `select` of `build_train_state` for a training run: ESFT's expert masks, scored on
  each domain's training data, and the oracle DGES control's exclusion."""

  def select(model, mc: MethodConfig):
    if mc.is_esft:
      per_domain = {i: data_lib.MixtureIterator([s], tokenizer, seq_len=config.data.seq_len,
                                                batch_size=config.data.batch_size,
                                                seed=config.seed)
                    for i, s in enumerate(train_specs)}
      masks = esft_lib.esft_masks(model, per_domain, mc.esft_score, mc.esft, mc.num_domains,
                                  place=place)
      specialization.des_state(model).expert_mask[...] = jnp.asarray(masks)
      log.info("ESFT-%s selected %.1f%% of routed experts", mc.esft_score, 100 * masks.mean())
    if mc.dges.exclude_general_top:
      exclude_general_experts(model, config, tokenizer, mc.dges.exclude_general_top, place)

  return select


# Real tokens of general text (data.general) that rank experts for dges.exclude_general_top.
GENERAL_SAMPLE_TOKENS = 32768


def exclude_general_experts(model, config, tokenizer, n: int, place=jnp.asarray):
  """The oracle DGES control: ranks each MoE layer's experts by the share of the (still
  pretrained) model's top-k slots that general text gives them, over the first
  GENERAL_SAMPLE_TOKENS tokens of data.general, and removes the top `n` from every mask."""
  e = model.config.n_routed_experts
  if n >= e:
    raise ConfigError(f"config.dges.exclude_general_top={n} would exclude all {e} routed "
                      "experts of a layer")
  batches = data_lib.text_loss_batches(
      config.data.general, tokenizer, seq_len=config.data.seq_len,
      batch_size=config.data.batch_size,
      max_batches=-(-GENERAL_SAMPLE_TOKENS // (config.data.batch_size * config.data.seq_len)))
  share = esft_lib.domain_scores(model, batches, GENERAL_SAMPLE_TOKENS, e, place)["token"]
  excluded = specialization.top_share_experts(share, n)                        # [L, E]
  specialization.exclude_experts(model, excluded)
  log.info("oracle DGES: the %d experts per layer with the most general-text routing (%.1f%% "
           "of its top-k slots) excluded from every mask", n,
           100 * float((np.asarray(share) * excluded).sum(-1).mean()))
