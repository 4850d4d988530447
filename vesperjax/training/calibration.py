"""How well a confidence predicts correctness: expected calibration error and AUROC.

Two forms of each number:

- exact, from per-token arrays on the host (`expected_calibration_error`, `auroc`);
- from `binned_stats`, fixed-size sums that an eval step computes on device and the
  caller adds over batches (sums reduce across devices and hosts, per-token arrays
  would not fit): `summarize` turns them into the same numbers. ECE from the sums is
  exact; AUROC is exact for the scores rounded to `AUROC_BINS` equal-width bins (pairs
  within one bin count one half, as ties do).

ECE uses `ECE_BINS` equal-width bins of confidence on [0, 1] (the last one closed):
sum over bins of (tokens in bin / tokens) * |accuracy in bin - mean confidence in bin|.
AUROC is the probability that a random correct token gets a higher confidence than a
random incorrect one (ties count one half); NaN when either class is empty.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15
AUROC_BINS = 4096


def _bin_index(conf, bins: int, xp=np):
  """Equal-width bin of each confidence in [0, 1]; 1.0 falls in the last bin."""
  return xp.clip(xp.floor(conf * bins), 0, bins - 1).astype(xp.int32)


def expected_calibration_error(conf, correct, bins: int = ECE_BINS) -> float:
  """ECE of confidences `conf` [N] in [0, 1] against 0/1 outcomes `correct` [N]."""
  conf = np.asarray(conf, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  if conf.size == 0:
    return float("nan")
  idx = _bin_index(conf, bins)
  count = np.bincount(idx, minlength=bins)
  conf_sum = np.bincount(idx, conf, minlength=bins)
  correct_sum = np.bincount(idx, correct, minlength=bins)
  return _ece(count, conf_sum, correct_sum)


def _ece(count, conf_sum, correct_sum) -> float:
  count, conf_sum, correct_sum = (np.asarray(a, np.float64)
                                  for a in (count, conf_sum, correct_sum))
  total = count.sum()
  if total == 0:
    return float("nan")
  return float(np.abs(correct_sum - conf_sum).sum() / total)  # n_b |acc_b - conf_b| / N


def auroc(scores, labels) -> float:
  """Area under the ROC curve of `scores` [N] for binary `labels` [N] (Mann-Whitney U,
  ties counted one half)."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1).astype(bool)
  pos, neg = int(labels.sum()), int((~labels).sum())
  if pos == 0 or neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(scores.size, np.float64)
  sorted_scores = scores[order]
  # average 1-based rank within each run of equal scores
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], scores.size]
  avg = (starts + ends + 1) / 2.0
  ranks[order] = np.repeat(avg, ends - starts)
  return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _auroc_from_histograms(pos_hist, neg_hist) -> float:
  pos_hist = np.asarray(pos_hist, np.float64)
  neg_hist = np.asarray(neg_hist, np.float64)
  pos, neg = pos_hist.sum(), neg_hist.sum()
  if pos == 0 or neg == 0:
    return float("nan")
  neg_below = np.cumsum(neg_hist) - neg_hist
  return float((pos_hist * (neg_below + 0.5 * neg_hist)).sum() / (pos * neg))


def binned_stats(conf, correct, *, ece_bins: int = ECE_BINS,
                 auroc_bins: int = AUROC_BINS) -> dict:
  """Fixed-size sums of one batch (jax or numpy arrays; traceable under jit).

  Returns count, conf_sum, correct_sum [ece_bins] and pos_hist, neg_hist [auroc_bins]
  (float32); add them over batches, then `summarize`.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  conf = jnp.asarray(conf, jnp.float32).reshape(-1)
  correct = jnp.asarray(correct, jnp.float32).reshape(-1)
  idx = _bin_index(conf, ece_bins, jnp)
  zeros = jnp.zeros((ece_bins,), jnp.float32)
  fine = _bin_index(conf, auroc_bins, jnp)
  hist = jnp.zeros((auroc_bins,), jnp.float32)
  return {"count": zeros.at[idx].add(1.0), "conf_sum": zeros.at[idx].add(conf),
          "correct_sum": zeros.at[idx].add(correct),
          "pos_hist": hist.at[fine].add(correct), "neg_hist": hist.at[fine].add(1 - correct)}


def add_stats(total: dict | None, batch: dict) -> dict:
  """`total` + one batch's `binned_stats` (fp64 on the host; None starts a sum)."""
  batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  if total is None:
    return batch
  return {k: total[k] + batch[k] for k in total}


def summarize(stats: dict) -> dict:
  """{"ece", "auroc", "accuracy", "confidence"} of summed `binned_stats`."""
  count = np.asarray(stats["count"], np.float64)
  total = count.sum()
  return {"ece": _ece(count, stats["conf_sum"], stats["correct_sum"]),
          "auroc": _auroc_from_histograms(stats["pos_hist"], stats["neg_hist"]),
          "accuracy": float(np.sum(stats["correct_sum"]) / total) if total else float("nan"),
          "confidence": float(np.sum(stats["conf_sum"]) / total) if total else float("nan")}


def eval_metrics(stats: dict) -> dict:
  """Logged scalars of summed stats per predictor ({name: binned_stats sums}):
  `eval_{name}_ece` and `eval_{name}_auroc` (left out when undefined: no tokens, or
  one class only), and `eval_top1_accuracy` from the "softmax" predictor's outcomes."""
  out = {}
  for name, sums in stats.items():
    summary = summarize(sums)
    for key in ("ece", "auroc"):
      if np.isfinite(summary[key]):
        out[f"eval_{name}_{key}"] = summary[key]
    if name == "softmax" and np.isfinite(summary["accuracy"]):
      out["eval_top1_accuracy"] = summary["accuracy"]
  return out
