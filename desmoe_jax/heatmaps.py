"""The heatmaps drawn at every evaluation of a run: domain x expert correlation with the masks,
and the domains' mask overlap (PNG, under <workdir>/plots/)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from desmoe_jax import distributed


def heatmap_paths(workdir: str, step: int) -> dict[str, str]:
  """The PNGs drawn at the evaluation of `step`: {"correlation": path, "overlap": path}."""
  prefix = os.path.join(workdir, "plots", f"step{step:06d}")
  return {"correlation": prefix + "_correlation.png", "overlap": prefix + "_overlap.png"}


def save_heatmaps(des, domain_names, paths: dict[str, str], max_layers: int):
  """PNG heatmaps (`heatmap_paths`): domain x expert correlation (a few MoE layers) and domain
  mask overlap.

  Every process of a multi-process run must call it (the matrices are gathered); process 0
  draws and writes them."""
  corr, mask = distributed.to_host((des.correlation[...], des.expert_mask[...]))  # [L,D,E]
  if jax.process_index() != 0:
    return
  for path in paths.values():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from desmoe_jax.specialization import mask_overlap

  layers = np.unique(np.linspace(0, corr.shape[0] - 1, min(max_layers, corr.shape[0])).astype(int))
  fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, corr.shape[2] * 0.18),
                                                    1.2 + 0.35 * corr.shape[1] * len(layers)),
                           squeeze=False)
  for ax, layer in zip(axes[:, 0], layers):
    im = ax.imshow(corr[layer], aspect="auto", cmap="viridis")
    ys, xs = np.nonzero(mask[layer] > 0)
    ax.scatter(xs, ys, s=4, c="white", marker="s", linewidths=0)
    ax.set_yticks(range(len(domain_names)), domain_names, fontsize=7)
    ax.set_title(f"MoE layer {layer}: correlation A (dots: mask M)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.02)
  axes[-1, 0].set_xlabel("routed expert")
  fig.tight_layout()
  fig.savefig(paths["correlation"], dpi=110)
  plt.close(fig)

  overlap = np.asarray(mask_overlap(jnp.asarray(mask)))
  fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(domain_names),) * 2)
  im = ax.imshow(overlap, vmin=0, vmax=1, cmap="magma")
  ax.set_xticks(range(len(domain_names)), domain_names, rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(len(domain_names)), domain_names, fontsize=7)
  for i in range(len(domain_names)):
    for j in range(len(domain_names)):
      ax.text(j, i, f"{overlap[i, j]:.2f}", ha="center", va="center", fontsize=6,
              color="white" if overlap[i, j] < 0.6 else "black")
  ax.set_title("expert mask overlap (Jaccard, mean over layers)", fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(paths["overlap"], dpi=110)
  plt.close(fig)
