"""Plots of an optimizer-sweep report (`bench.optimizers`): five PNGs per report.

`python -m vesperjax.benchmark plot --report WORKDIR/benchmark_report.json` redraws them.
"""
from __future__ import annotations

import os

import numpy as np

from vesperjax.bench.optimizers import moving_mean


def _curve_stats(runs, key, window):
  ys = np.stack([moving_mean(r["curves"][key], window) for r in runs])
  return ys.mean(0), ys.min(0), ys.max(0)


def plot_report(report: dict, out_dir: str) -> list[str]:
  """Five PNGs: loss curves (seed bands), val loss vs LR, adaptive scales, grad norm,
  and Velvet's effective LR and beta1 against the training loss."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  runs, summary = report["runs"], report["summary"]
  colors = {"velvet": "tab:purple", "adamw": "tab:green", "adamw-clipped-b1": "tab:olive",
            "velvet-entropy": "tab:blue", "velvet-perplexity": "tab:red",
            "velvet-rules-off": "tab:gray"}
  styles = ["-", "--", ":", "-."]
  lrs = sorted({r["lr"] for r in runs})
  window = max(1, report["steps"] // 20)
  paths = []

  def group(name, lr):
    return [r for r in runs if r["optimizer"] == name and r["lr"] == lr]

  def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  # 1. training loss (smoothed, min-max band over seeds) + validation points
  fig, (ax, axv) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name in report["optimizers"]:
    for i, lr in enumerate(lrs):
      rs = group(name, lr)
      if not rs:
        continue
      mean, lo, hi = _curve_stats(rs, "loss", window)
      x = np.arange(1, len(mean) + 1)
      label = f"{name} lr={lr:g}"
      ax.plot(x, mean, styles[i % 4], color=colors.get(name), label=label, lw=1.3)
      ax.fill_between(x, lo, hi, color=colors.get(name), alpha=0.12)
      ev = np.array([[s for s, _ in r["evals"]] for r in rs])[0]
      vals = np.array([[v for _, v in r["evals"]] for r in rs])
      axv.errorbar(ev, vals.mean(0), yerr=vals.std(0), fmt=styles[i % 4] + "o",
                   color=colors.get(name), label=label, ms=3, capsize=2)
  ax.set(title=f"training loss (moving avg {window}, band = seed min-max)", xlabel="step",
         ylabel="loss")
  axv.set(title="validation loss (mean ± std over seeds)", xlabel="step", ylabel="loss")
  for a in (ax, axv):
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
  save(fig, "loss_curves.png")

  # 2. final validation loss vs LR
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name in report["optimizers"]:
    rows = [r for r in summary["table"] if r["optimizer"] == name]
    ax.errorbar([r["lr"] for r in rows], [r["val_mean"] for r in rows],
                yerr=[r["val_std"] for r in rows], fmt="o-", color=colors.get(name),
                label=name, capsize=3)
  ax.set_xscale("log")
  ax.set(title=f"final validation loss vs peak LR ({report['steps']} steps, "
         f"{report['seeds']} seeds)", xlabel="peak learning rate", ylabel="val loss")
  ax.legend()
  ax.grid(alpha=0.3, which="both")
  save(fig, "val_loss_vs_lr.png")

  # 3. Velvet's adaptive signals over time, at each LR
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for i, lr in enumerate(lrs):
    rs = group("velvet", lr)
    if not rs or "entropy_scale" not in rs[0]["curves"]:
      continue
    for a, key in zip(axes, ("entropy_scale", "perplexity_scale", "learning_rate")):
      mean, lo, hi = _curve_stats(rs, key, 1)
      x = np.arange(1, len(mean) + 1)
      a.plot(x, mean, styles[i % 4], color=colors["velvet"], label=f"velvet lr={lr:g}")
      a.fill_between(x, lo, hi, color=colors["velvet"], alpha=0.12)
  for lr in lrs[:1]:
    rs = group("adamw", lr)
    if rs:
      axes[2].plot(rs[0]["curves"]["learning_rate"], color=colors["adamw"],
                   label=f"adamw schedule lr={lr:g}", lw=1)
  for a, title in zip(axes, ("entropy scale (LR multiplier)",
                             "perplexity scale (beta1 multiplier)", "effective LR")):
    a.set(title=title, xlabel="step")
    if a.get_legend_handles_labels()[0]:  # empty without Velvet runs
      a.legend(fontsize=7)
    a.grid(alpha=0.3)
  save(fig, "adaptive_scales.png")

  # 4. gradient norm (pre-clip)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in report["optimizers"]:
    for i, lr in enumerate(lrs):
      rs = group(name, lr)
      if rs and "grad_norm" in rs[0]["curves"]:
        mean, lo, hi = _curve_stats(rs, "grad_norm", window)
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, styles[i % 4], color=colors.get(name), label=f"{name} lr={lr:g}")
        ax.fill_between(x, lo, hi, color=colors.get(name), alpha=0.12)
  ax.set_yscale("log")
  ax.set(title=f"global gradient norm before clipping (moving avg {window})",
         xlabel="step")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  save(fig, "grad_norm.png")

  # 5. what the rules do as the loss falls: effective LR and beta1 at each arm's best LR
  fig, (axl, axb, axc) = plt.subplots(1, 3, figsize=(17, 4.5))
  for name in report["optimizers"]:
    best = summary["best"].get(name)
    rs = group(name, best["lr"]) if best else []
    if not rs:
      continue
    loss, _, _ = _curve_stats(rs, "loss", window)
    curves = rs[0]["curves"]
    # Velvet logs its effective LR (the schedule x the entropy scale); AdamW the schedule
    lr_eff = np.mean([r["curves"]["learning_rate"] for r in rs], 0)
    b1 = (np.mean([r["curves"]["b1"] for r in rs], 0) if "b1" in curves else
          np.full(len(loss), _arm_b1(report, name)))
    label = f"{name} lr={best['lr']:g}"
    style = dict(color=colors.get(name), label=label, lw=1.2)
    axl.plot(loss, moving_mean(lr_eff, window), **style)
    axb.plot(loss, moving_mean(b1, window), **style)
    if "b1" in curves:  # per step b1 follows the batch's loss: how often it is capped
      capped = np.mean([np.asarray(r["curves"]["b1"]) >= 0.999 - 1e-6 for r in rs], 0)
      axc.plot(np.arange(1, len(capped) + 1), moving_mean(capped, window), **style)
  for a, title in ((axl, "effective LR (schedule x entropy scale)"),
                   (axb, "beta1 (perplexity rule)")):
    a.set(title=f"{title} vs training loss (moving avg {window})",
          xlabel="training loss (falls to the right)")
    a.invert_xaxis()
    a.grid(alpha=0.3)
    if a.get_legend_handles_labels()[0]:
      a.legend(fontsize=7)
  for x in (np.log(40 / 0.7), np.log(40 / 1.3)):  # the perplexity scale's clips
    axb.axvline(x, color="grey", ls=":", lw=1)
  axc.set(title=f"share of steps with beta1 at its 0.999 cap (moving avg {window})",
          xlabel="step")
  axc.grid(alpha=0.3)
  if axc.get_legend_handles_labels()[0]:
    axc.legend(fontsize=7)
  save(fig, "rules_vs_loss.png")
  return paths


def _arm_b1(report: dict, name: str) -> float:
  """An AdamW arm's constant beta1, as its runs were configured."""
  b1 = report.get("config", {}).get("optim", {}).get("b1", 0.9)
  return float(report.get("arms", {}).get(name, {}).get("b1", b1))
