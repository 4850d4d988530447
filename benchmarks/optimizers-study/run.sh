#!/usr/bin/env bash
# The optimizer study (docs/benchmarks.md#the-optimizer-study): one cell per
# call, a report that grows (finished runs are kept), niced so other work goes first.
#   benchmarks/optimizers-study/run.sh CELL [SEEDS] [ARMS]
# CELL: code-2x128 | prose-2x128 | code-3x192 | prose-3x192. SEEDS 1 runs the LR sweep
# at the first seed (bracketing each optimum); SEEDS 3 adds seeds 2 and 3 at each arm's
# two best LRs of that sweep.
set -euo pipefail
cd "$(dirname "$0")/../.."
cell=${1:?cell}; seeds=${2:-1}
arms=${3:-velvet,adamw,velvet-corrected,muon,schedule-free-adamw,ademamix}
case $cell in
  code-*) data=(--config.data.dataset=stdlib) ;;
  prose-*) data=(--config.data.dataset=stdlib-docs --config.data.val_percent=10) ;;
  *) echo "error: unknown cell $cell" >&2; exit 2 ;;
esac
case $cell in
  *-2x128) model=(--config.model.hidden_size=128 --config.model.num_layers=2
                  --config.model.ffn_size=512) ;;
  *-3x192) model=(--config.model.hidden_size=192 --config.model.num_layers=3
                  --config.model.ffn_size=768) ;;
esac
exec nice -n 19 python -m vesperjax.benchmark optimizers --config experiments/tiny.py \
  --workdir "benchmarks/optimizers-study/$cell" --seeds "$seeds" --top-lrs 2 --bracket 2 \
  --lrs 1e-3,1.4e-3,2e-3,2.8e-3 --steps 2000 --optimizers "$arms" \
  "${model[@]}" "${data[@]}" --config.data.seq_len=64 --config.data.tokenizer=bpe:2048 \
  --config.train.eval_every=250 --config.train.eval_batches=32 \
  --config.optim.warmup_steps=50
