"""LoRA as a method (desmoe_jax/lora.py): exact at init, only its factors train (and hold
optimizer state), every target switches on and off, the routed experts' per-expert pairs give
the same numbers under every dispatch and under expert parallelism, and the merged export is
the adapted model, in our code and in plain transformers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import batch, tiny_model

from desmoe_jax import lora, optim, sharding
from desmoe_jax import train_step as ts
from desmoe_jax.convert import from_pretrained
from desmoe_jax.export import export_hf
from desmoe_jax.lora import TARGETS, LoraConfig
from desmoe_jax.methods import UNSCHEDULED, MethodConfig, prepare_model
from desmoe_jax.moe.block import IMPLS

D = 3


SMALL = dict(num_hidden_layers=2)   # one dense and one MoE layer: compiles fastest


def lora_model(targets=",".join(TARGETS), seed=1, with_desmoe=False, dropout=0.0, **kw):
  mc = MethodConfig(method="lora", num_domains=D, total_steps=10,
                    lora=LoraConfig(rank=4, alpha=8.0, targets=targets, with_desmoe=with_desmoe,
                                    dropout=dropout))
  return mc, prepare_model(tiny_model(seed=seed, **SMALL, **kw), mc)


def logits(model, ids):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)(state, ids))


def factors(model):
  return {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "lora" in p}


def perturb(model, seed=0, scale=0.3):
  """Nonzero A and B everywhere, as training would leave them: the pairs change the model."""
  for i, (_, v) in enumerate(sorted(factors(model).items())):
    v[...] = scale * jax.random.normal(jax.random.key(seed * 1000 + i), v.shape, v.dtype)
  return model


def test_init_is_the_base_model_bit_for_bit():
  ids = batch(0, [0, 1, 2])["tokens"]
  base = logits(tiny_model(seed=1, **SMALL), ids)
  _, model = lora_model()
  assert factors(model)
  np.testing.assert_array_equal(logits(model, ids), base)


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_switches_on_alone(target):
  """A single target adapts its modules only (every other weight has no pair), and the
  factors' group is `lora_` + the group of the weight they adapt."""
  _, model = lora_model(target)
  got = factors(model)
  assert got
  where = {p: lora.target_of(p[:p.index("lora")]) for p in got}
  assert set(where.values()) == {target}
  want_group = {"attention": "lora_backbone", "dense_mlp": "lora_backbone",
                "shared_experts": "lora_shared_experts", "router": "lora_router",
                "routed_experts": "lora_routed_experts"}[target]
  assert {optim.label_of(v) for v in got.values()} == {want_group}
  if target == "routed_experts":  # a pair per expert, stacked over layers: [L, E, d, r]
    a = model.moe_blocks().experts.lora.gate_proj.a
    assert a.shape == (1, 8, 32, 4) and model.moe_blocks().experts.lora.up_proj.b.shape == (
        1, 8, 4, 16)


def test_targets_a_family_lacks_adapt_nothing():
  """No dense layer: the default targets still apply (dense_mlp adapts nothing), naming only
  absent targets is an error naming the field."""
  mc = MethodConfig(method="lora", num_domains=D, total_steps=10)
  model = prepare_model(tiny_model(seed=1, num_hidden_layers=1, first_k_dense_replace=0), mc)
  assert {lora.target_of(p[:p.index("lora")]) for p in factors(model)} == set(TARGETS) - {
      "dense_mlp"}
  mc = MethodConfig(method="lora", num_domains=D, total_steps=10,
                    lora=LoraConfig(targets="dense_mlp"))
  with pytest.raises(ValueError, match="lora.targets='dense_mlp': this model"):
    prepare_model(tiny_model(seed=1, num_hidden_layers=1, first_k_dense_replace=0), mc)


def test_bad_lora_fields_are_named():
  with pytest.raises(ValueError, match="lora.targets='attention,mlp'"):
    LoraConfig(targets="attention,mlp")
  with pytest.raises(ValueError, match="lora.rank=0"):
    LoraConfig(rank=0)
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match=rf"lora.dropout={bad} must be in \[0, 1\)"):
      LoraConfig(dropout=bad)
  with pytest.raises(ValueError, match="remove 'router' from lora.targets"):
    LoraConfig(with_desmoe=True)
  from desmoe_jax.run_config import load_config
  from desmoe_jax.validate import problems
  config = load_config("configs/six_domains.py:tiny,lora", {"lora.targets": "attention,ffn",
                                                            "lora.alpha": 0.0})
  found = problems(config)
  assert any(p.startswith("lora.targets='attention,ffn': must be a comma-separated list")
             and "'ffn'" in p for p in found), found
  assert any(p.startswith("lora.alpha=0.0: must be > 0") for p in found), found
  found = problems(load_config("configs/six_domains.py:tiny,lora", {"lora.dropout": 1.0}))
  assert found == ["lora.dropout=1.0: must be in [0, 1)"], found
  found = problems(load_config("configs/six_domains.py:tiny,lora",
                               {"lora.dropout": 0.1, "model.expert_parallel": "shard_map"}))
  assert any(p.startswith("lora.dropout=0.1 with model.expert_parallel='shard_map'")
             for p in found), found


def test_only_the_factors_train_and_only_they_hold_optimizer_state():
  """Two train steps: every base weight is bit-identical, every target's factors moved; the
  optimizer's moments cover the factors' elements and nothing else."""
  mc, model = lora_model()
  oc = optim.OptimConfig(learning_rate=1e-2)
  graphdef, state = nnx.split(model)
  opt = ts.init_optimizer(mc, oc, state)
  factor_elems = sum(v.size for v in factors(model).values())
  moment_elems = sum(x.size for x in jax.tree.leaves(opt) if getattr(x, "ndim", 0) > 0)
  assert moment_elems == 2 * factor_elems   # Adam's mu and nu, for the factors only
  step = jax.jit(ts.make_train_step(graphdef, mc, oc, UNSCHEDULED))
  new = state
  for i in range(2):
    new, opt, m = step(new, opt, batch(i, [0, 1, 2, 0]), jnp.asarray(i))
  assert np.isfinite(float(m["loss"]))
  before, after = dict(nnx.to_flat_state(state)), dict(nnx.to_flat_state(new))
  moved = set()
  for path, v in before.items():
    same = np.array_equal(np.asarray(v[...]), np.asarray(after[path][...]))
    if "lora" not in path and isinstance(v, nnx.Param):
      assert same, path
    if "lora" in path and path[-1] == "b" and not same:
      moved.add(lora.target_of(path[:path.index("lora")]))
  assert moved == set(TARGETS)


def _loss_and_factor_grads(model, ids):
  graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, lambda p, _: "lora" in p), ...)

  def loss(params):
    out = nnx.merge(graphdef, params, rest)(ids)
    return (out.logits ** 2).mean() + out.aux_loss

  return jax.jit(jax.value_and_grad(loss))(params)


def test_routed_expert_pairs_agree_under_every_dispatch_and_expert_parallel():
  """Loss and the gradients of every factor, the routed experts' pairs perturbed: every
  moe_impl equals `dense`, and so does the shard_map dispatch on 8 simulated devices
  (expert=4 x fsdp=2)."""
  ids = batch(3, [0, 1, 2, 1, 0, 2, 1, 0])["tokens"]
  results = {}
  for impl in IMPLS:
    _, model = lora_model("routed_experts,shared_experts", moe_impl=impl)
    results[impl] = _loss_and_factor_grads(perturb(model), ids)
  _, model = lora_model("routed_experts,shared_experts", expert_parallel="shard_map",
                        moe_impl="tiled")
  perturb(model)
  mesh = sharding.make_mesh({"expert": 4, "fsdp": 2})
  sharding.shard_model(model, mesh)
  with jax.set_mesh(mesh):
    results["shard_map"] = jax.device_get(_loss_and_factor_grads(
        model, jax.device_put(ids, sharding.batch_sharding(mesh))))
  want_loss, want = results.pop("dense")
  flat_want = dict(nnx.to_flat_state(want))
  assert any(np.abs(v[...]).max() > 1e-4 for p, v in flat_want.items() if "experts" in p)
  for name, (got_loss, got) in results.items():
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5, err_msg=name)
    for path, v in nnx.to_flat_state(got):
      np.testing.assert_allclose(np.asarray(v[...]), np.asarray(flat_want[path][...]),
                                 atol=1e-5, rtol=1e-4, err_msg=f"{name} {path}")


def test_merged_export_is_the_adapted_model_in_transformers(tmp_path):
  """export_hf merges W + (alpha / r) A B (routed experts included): our reloaded export and
  plain transformers' DeepseekV2ForCausalLM give the adapted model's logits."""
  _, model = lora_model()
  perturb(model, scale=0.1)
  batches = [{"tokens": batch(i, [0, 1, 2, 1])["tokens"]} for i in range(3)]
  ids = np.asarray(batches[0]["tokens"])
  adapted = logits(model, ids)
  assert np.abs(adapted - logits(tiny_model(seed=1, **SMALL), ids)).max() > 1e-2
  report = export_hf(model, str(tmp_path), tokenizer_dir=None, fit_batches=batches)
  assert report["merged_lora"] and not lora.attached(model)
  np.testing.assert_allclose(logits(model, ids), adapted, atol=1e-5)
  reloaded = from_pretrained(str(tmp_path), dtype=jnp.float32)
  np.testing.assert_allclose(logits(reloaded, ids), adapted, atol=1e-5)
  from transformers import DeepseekV2ForCausalLM
  hf = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ref, adapted, atol=1e-4)


def test_with_desmoe_masks_and_phases_act_on_the_expert_factors():
  """lora.with_desmoe: in phase II the ALR and the routed experts' factors train, and only the
  factors of experts that a domain in the batch owns move (gradient isolation and the
  per-expert update mask on [L, E, ...] factors); the other factors and every weight stay."""
  from desmoe_jax.router import AdaptiveRouter
  from desmoe_jax.schedule import STABILIZATION
  mc, model = lora_model("attention,routed_experts", with_desmoe=True)
  assert mc.use_alr and mc.apply_masks and mc.use_schedule
  assert isinstance(model.moe_blocks().gate, AdaptiveRouter)
  assert mc.trainable(STABILIZATION) == {"router", "lora_routed_experts"}
  des = model.moe_blocks().des
  mask = np.zeros(des.expert_mask.shape, np.float32)   # [L, D, E]
  mask[:, 0, :4] = 1                                    # domain 0 owns experts 0-3
  des.expert_mask[...] = jnp.asarray(mask)
  oc = optim.OptimConfig(learning_rate=1e-2)
  graphdef, state = nnx.split(model)
  opt = ts.init_optimizer(mc, oc, state)
  step = jax.jit(ts.make_train_step(graphdef, mc, oc, STABILIZATION))
  new, _, _ = step(state, opt, batch(0, [0, 0, 0, 0]), jnp.asarray(5))
  before, after = dict(nnx.to_flat_state(state)), dict(nnx.to_flat_state(new))
  for path, v in before.items():
    if not isinstance(v, nnx.Param) or path[-2:] == ("gate", "w1"):
      continue
    old, got = np.asarray(v[...]), np.asarray(after[path][...])
    if "experts" in path and "lora" in path:
      np.testing.assert_array_equal(got[:, 4:], old[:, 4:], err_msg=str(path))
      if path[-1] == "b":
        assert not np.array_equal(got[:, :4], old[:, :4]), path
    elif "gate" not in path:   # the ALR trains; everything else is frozen in phase II
      np.testing.assert_array_equal(got, old, err_msg=str(path))


def test_cached_decode_reads_the_pairs():
  """Greedy generation with the KV cache (MLA's absorbed decode reads kv_b_proj's W + s A B)
  gives the merged model's tokens."""
  from desmoe_jax.generate import greedy_generate
  _, model = lora_model("attention,routed_experts")
  perturb(model, scale=0.2)
  prompts = [[5, 9, 3, 7], [11, 2]]
  got = greedy_generate(model, prompts, max_new_tokens=4, eos_ids=[-1], batch_size=2)
  want = greedy_generate(lora.merge(model), prompts, max_new_tokens=4, eos_ids=[-1],
                         batch_size=2)
  assert got == want


# lora.dropout ------------------------------------------------------------------------------


def test_dropout_zero_draws_no_masks():
  """lora.dropout=0 (the default): set_dropout gives no pair a key, so the train step's
  forward is the merged path of before, bit for bit."""
  _, model = lora_model()
  perturb(model)
  ids = batch(0, [0, 1, 2])["tokens"]
  want = logits(model, ids)
  lora.set_dropout(model, lora.dropout_key(0, 3))
  assert all(m.lora.dropout_key is None for _, m, _ in lora.hosts(model))
  np.testing.assert_array_equal(logits(model, ids), want)


def test_dropout_is_off_outside_training():
  """Eval, export and generation never set the keys: a model with lora.dropout=0.5 computes
  exactly as the one with dropout 0 and the same factors."""
  ids = batch(0, [0, 1, 2])["tokens"]
  _, plain = lora_model()
  _, dropped = lora_model(dropout=0.5)
  perturb(plain), perturb(dropped)
  np.testing.assert_array_equal(logits(dropped, ids), logits(plain, ids))
  from desmoe_jax.generate import greedy_generate
  prompts = [[5, 9, 3, 7]]
  assert greedy_generate(dropped, prompts, max_new_tokens=3, eos_ids=[-1]) == greedy_generate(
      plain, prompts, max_new_tokens=3, eos_ids=[-1])


def _keep(key, shape, rate):
  """The hand mask: kept elements scaled by 1 / (1 - rate) (torch's nn.Dropout)."""
  keep = jax.random.bernoulli(jax.random.wrap_key_data(key), 1 - rate, shape)
  return keep.astype(jnp.float32) / (1 - rate)


def test_dropout_on_a_linear_is_on_the_branch_input_only():
  """y = x W + s ((x * m) A) B with the mask m of the pair's key; its gradients in A and B
  equal the hand computation's."""
  from desmoe_jax.nn.layers import Linear
  rate = 0.4
  layer = Linear(6, 5, (None, None), rngs=nnx.Rngs(0))
  layer.lora = lora._pair_for(layer.kernel, 3, 2.0, jax.random.key(1), "backbone", rate)
  layer.lora.b[...] = jax.random.normal(jax.random.key(2), (3, 5))
  key = jax.random.key_data(jax.random.key(7))
  layer.lora.dropout_key = key
  x = jax.random.normal(jax.random.key(3), (4, 6))
  w = layer.kernel[...]
  m = _keep(key, x.shape, rate)
  assert 0 < float((m == 0).mean()) < 1

  def hand(a, b):
    return x @ w + 2.0 * ((x * m) @ a) @ b

  graphdef, state = nnx.split(layer)

  def ours(a, b):
    flat = dict(nnx.to_flat_state(state))
    for name, value in (("a", a), ("b", b)):
      flat[("lora", name)] = flat[("lora", name)].replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))(x)

  a, b = layer.lora.a[...], layer.lora.b[...]
  np.testing.assert_allclose(ours(a, b), hand(a, b), rtol=1e-6, atol=1e-6)
  ct = jax.random.normal(jax.random.key(4), (4, 5))
  g_hand = jax.grad(lambda a, b: (hand(a, b) * ct).sum(), argnums=(0, 1))(a, b)
  g_ours = jax.grad(lambda a, b: (ours(a, b) * ct).sum(), argnums=(0, 1))(a, b)
  for got, want in zip(g_ours, g_hand):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _naive_experts(x_td, ids_tk, ws, factors, scale, masks):
  """Slot by slot, each slot with its own expert's weights and factors gathered ([T*K, ...]):
  y[t, k] = FFN_e(x[t]) with each weight's branch on its masked input."""
  t_, k_ = ids_tk.shape
  e_n = ids_tk.reshape(-1)
  x_nd = jnp.repeat(x_td, k_, axis=0)                     # slot t*K + k reads token t

  def lin(v, j):
    (a, b), w = factors[j], ws[j]
    low = jnp.einsum("nr,nrf->nf", jnp.einsum("nd,ndr->nr", v * masks[j], a[e_n]), b[e_n])
    return jnp.einsum("nd,ndf->nf", v, w[e_n]) + scale * low

  h = jax.nn.silu(lin(x_nd, 0)) * lin(x_nd, 1)
  return lin(h, 2).reshape(t_, k_, -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_dropout_equals_the_naive_loop(impl):
  """Routed experts, lora.dropout=0.5: one mask per (token, slot) and per weight (PEFT's
  per-expert Linears); every moe_impl's outputs and factor gradients equal a slot-by-slot
  computation with the same masks."""
  from desmoe_jax.moe.block import expert_outputs
  e, d, f, r, t, k, rate = 4, 8, 6, 2, 5, 2, 0.5
  keys = iter(jax.random.split(jax.random.key(0), 16))
  rnd = lambda *shape: 0.3 * jax.random.normal(next(keys), shape)
  ws = (rnd(e, d, f), rnd(e, d, f), rnd(e, f, d))
  pairs = {n: lora.LoraPair(rnd(e, w.shape[1], r), rnd(e, r, w.shape[2]), (None,) * 3,
                            (None,) * 3, "lora_routed_experts", 1.5)
           for n, w in zip(lora.EXPERT_WEIGHTS, ws)}
  expert_lora = lora.ExpertLora(pairs, rate)
  assert expert_lora.branch(t * k, jnp.float32) is None   # no key: eval, merged
  expert_lora.dropout_key = jax.random.key_data(jax.random.key(5))
  factors, scale, masks = expert_lora.branch(t * k, jnp.float32)
  assert [m.shape for m in masks] == [(t * k, d), (t * k, d), (t * k, f)]
  assert not np.array_equal(masks[0], masks[1])           # gate and up: their own masks
  assert set(np.unique(np.concatenate([np.ravel(m) for m in masks]))) == {0.0, 2.0}
  x = rnd(t, d)
  ids = jax.random.randint(next(keys), (t, k), 0, e)
  ct = rnd(t, k, d)

  def loss(fn, factors):
    return (fn(factors) * ct).sum()

  ours = lambda fs: expert_outputs(x, ids, *ws, impl=impl, lora=(fs, scale, masks))
  naive = lambda fs: _naive_experts(x, ids, ws, fs, scale, masks)
  np.testing.assert_allclose(ours(factors), naive(factors), rtol=1e-5, atol=1e-6)
  got = jax.grad(functools.partial(loss, ours))(factors)
  want = jax.grad(functools.partial(loss, naive))(factors)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_dropout_train_step_is_a_function_of_seed_and_step():
  """lora.dropout=0.3 in the train step: the same (seed, step) gives the same new state bit
  for bit (a resumed run repeats it), another step other masks; every target's B moves
  otherwise than with dropout 0 (its branch saw the masks)."""
  oc = optim.OptimConfig(learning_rate=1e-2)
  news = {}
  for rate in (0.0, 0.3):
    mc, model = lora_model(dropout=rate)
    perturb(model, scale=0.1)
    graphdef, state = nnx.split(model)
    opt = ts.init_optimizer(mc, oc, state)
    step = jax.jit(ts.make_train_step(graphdef, mc, oc, UNSCHEDULED))
    b = batch(0, [0, 1, 2, 0])
    news[rate] = [dict(nnx.to_flat_state(step(state, opt, b, jnp.asarray(i))[0]))
                  for i in (0, 0, 1)]
  first, again, other = news[0.3]
  changed = set()
  for path, v in first.items():
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(again[path][...]))
    if "lora" in path and path[-1] == "b":
      assert not np.array_equal(np.asarray(v[...]), np.asarray(other[path][...])), path
      if not np.allclose(np.asarray(v[...]), np.asarray(news[0.0][0][path][...]), atol=1e-7):
        changed.add(lora.target_of(path[:path.index("lora")]))
  assert changed == set(TARGETS)


# Adapter-only export (desmoe_jax/peft_adapter.py) ------------------------------------------


def test_adapter_names_its_base_model_as_peft_does():
  from desmoe_jax import peft_adapter
  assert peft_adapter.base_model_name("hf://deepseek-ai/DeepSeek-V2-Lite@main") == (
      "deepseek-ai/DeepSeek-V2-Lite", "main")
  assert peft_adapter.base_model_name("/models/v2_lite") == ("/models/v2_lite", None)
  _, model = lora_model("attention", with_desmoe=True)
  assert "adaptive router" in peft_adapter.save_adapter(model, "unused")["reason"]


def test_adapter_export_loads_in_peft_and_gives_the_adapted_logits(tmp_path):
  """workdir/hf_adapter in PEFT's layout, every target (the routed experts as ParamWrapper
  pairs on transformers 5's fused 3-D parameters): its tensor names and shapes are PEFT's own
  for this config, and PeftModel.from_pretrained over the plain base model gives our adapted
  model's logits (1e-5, float32)."""
  peft = pytest.importorskip("peft")
  from peft.utils import get_peft_model_state_dict
  from safetensors.numpy import load_file
  from transformers import DeepseekV2ForCausalLM

  from desmoe_jax import peft_adapter
  from desmoe_jax.convert import save_pretrained
  save_pretrained(tiny_model(seed=1, **SMALL), str(tmp_path / "base"))
  _, model = lora_model(dropout=0.1)
  perturb(model, scale=0.1)
  ids = np.asarray(batch(0, [0, 1, 2, 1])["tokens"])
  adapted = logits(model, ids)
  report = peft_adapter.save_adapter(model, str(tmp_path / "adapter"), trained_dropout=0.1)
  # 2 layers x 4 attention projections; the fused gate_up and down, the router, the dense MLP's
  # and the shared experts' 3 linears each
  assert report["written"] and (report["target_modules"], report["target_parameters"]) == (8, 9)
  ours = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))

  def base():
    return DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                 dtype=torch.float32).eval()

  config = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
  fresh = get_peft_model_state_dict(peft.get_peft_model(base(), config))
  assert {k: tuple(v.shape) for k, v in fresh.items()} == {
      k: v.shape for k, v in ours.items()}
  hf = peft.PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ref, adapted, atol=1e-5, rtol=1e-5)
  assert np.abs(adapted - logits(tiny_model(seed=1, **SMALL), ids)).max() > 1e-2
