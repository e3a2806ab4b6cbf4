"""Round trip on the embedded tiny DeepSeek-V2: random init -> HF directory -> reload -> logits.

  python scripts/demo.py [--arch=tiny] [--out=/tmp/desmoe_demo]

Shows the public API (`desmoe_jax.from_pretrained`, `desmoe_jax.save_pretrained`); if PyTorch is
installed it also loads the exported directory with transformers and compares logits.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import desmoe_jax
from desmoe_jax.config import ModelConfig
from desmoe_jax.model import init_model
from desmoe_jax.run_config import load_config


def load_arch(name):
  return load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                  f"models.py:{name}")).to_dict()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="tiny")
  parser.add_argument("--out", default="/tmp/desmoe_demo")
  args = parser.parse_args()

  cfg = ModelConfig.make(**load_arch(args.arch))
  model = init_model(cfg, seed=0)
  desmoe_jax.save_pretrained(model, args.out)
  print(f"wrote {args.out}: {sorted(os.listdir(args.out))}")

  t0 = time.perf_counter()
  reloaded = desmoe_jax.from_pretrained(args.out, dtype=jnp.float32)
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
  out = reloaded(ids, return_routing=True)
  print(f"from_pretrained + forward: {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}")
  print(f"logits {out.logits.shape}, balance loss {float(out.aux_loss):.5f}, "
        f"top-{cfg.num_experts_per_tok} experts of token 0 per MoE layer: "
        f"{np.asarray(out.routing.topk_ids[:, 0]).tolist()}")
  diff = float(jnp.abs(out.logits - model(ids).logits).max())
  print(f"max |logits(reloaded) - logits(original)| = {diff:.2e}")

  try:
    import torch
    from transformers import DeepseekV2ForCausalLM
  except ImportError:
    print("(install torch==2.13.0 to also compare with transformers)")
    return
  hf = DeepseekV2ForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  print(f"max |logits(desmoe_jax) - logits(transformers)| = {np.abs(np.asarray(out.logits) - ref).max():.2e}")


if __name__ == "__main__":
  main()
