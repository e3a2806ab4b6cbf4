"""The optimizer: everything that builds, lays out, initialises or applies it (docs/METHOD.md
section 3).

  config.py      OptimConfig (`optim.*`) and the choices of its fields
  labels.py      each parameter's group and kind (metadata, or the path of a bare array)
  transforms.py  the optax transforms, and `build_optimizer`, which chains them for one phase
  int8.py        Adam with blockwise-quantised int8 moments
  rounding.py    stochastic rounding to bfloat16, the float32 master copy, `apply_updates`
  extra_args.py  the update's extra arguments (KD gradients, finiteness) and skipped updates
  phase.py       the optimizer of one phase: built, its state initialised and laid out, applied
  streamed.py    the update with the state in host memory, one stacked layer at a time

How the pieces serve the method:
* Every parameter's label (`schedule.LABELS`) is its `group` metadata, set by the module that
  creates it (routers, routed experts, shared experts; none = backbone): no path is parsed, so
  every family's layout gets the same groups. A group never trained in the run is
  `optax.set_to_zero()` and holds no optimizer state at all.
* A group trained in some phases only is wrapped by `hold`: in a phase that freezes it, its
  update is zero and its state (moments, count) is carried unchanged, so all phases share one
  optimizer-state structure and a checkpoint restores into any phase.
* Routed experts are stacked `[L, E, ...]`; a per-leaf label cannot freeze expert 5 of layer 3,
  so `mask_experts` multiplies the group's update by a per-expert mask AFTER AdamW and keeps the
  masked experts' moments unchanged: momentum and weight decay cannot move a masked expert.
* The learning rate follows the GLOBAL step (passed as `step=`), not a group's own count, so a
  group that starts training in phase II follows the same decay as the run.
* Weight decay skips the parameter kinds in `decay_exclude` (norm gains and biases by default,
  the HF/ESFT convention), read from the `kind` metadata their modules set.
* `per_expert_bias_correction`: the routed experts' Adam step count is one per expert ([L, E]),
  and `mask_experts` keeps a masked expert's count with its moments, so an expert first updated
  at step k gets Adam's first-step bias correction then, not step k's.
* `alr.mix="update"` (`mix_updates`): the router keeps two Adam states, one for its task
  gradient and one for its KD gradient (given as `update(..., router_kd_grads=)`), and moves by
  lambda u_KD + (1 - lambda) u_task of the two normalised updates.
"""

from desmoe_jax.optim.config import (ADAFACTOR_OFFLOAD, DECAY_EXCLUDE, MOMENT_DTYPES,
                                     OPTIMIZERS, SCHEDULES, OptimConfig)
from desmoe_jax.optim.extra_args import finiteness, router_kd_grads, update_skipped
from desmoe_jax.optim.int8 import (MU_POWER, NU_POWER, ScaleByAdamInt8State,
                                   dequantize_blockwise, quantize_blockwise, scale_by_adam_int8)
from desmoe_jax.optim.labels import (bare_label, decay_mask, is_variable, kind_of, label_of,
                                     param_labels, path_key, trainable_filter)
from desmoe_jax.optim.phase import (check_host_offload, init_optimizer, make_update,
                                    mixes_updates, optimizer_shardings, phase_optimizer,
                                    zeros_like_params)
from desmoe_jax.optim.rounding import (MasterState, apply_updates, hashed_bits16,
                                       master_weights, round_bf16_with_noise)
from desmoe_jax.optim.streamed import update_streamed
from desmoe_jax.optim.transforms import (MixState, ScaleByAdamPerExpertState,
                                         apply_if_finite_given, build_optimizer,
                                         clip_by_given_norm, decayed_weights, direction, hold,
                                         in_float32, learning_rate_schedule, mask_experts,
                                         mix_updates, scale_by_adam_per_expert,
                                         scale_by_global_lr, state_bytes, state_in)
