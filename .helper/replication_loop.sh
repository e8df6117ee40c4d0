#!/usr/bin/env bash
# Replication at toy scale: 36 runs of rpo.py (12 configurations x 3 seeds), two at a time on one thread each.
# Run from the repo root. Each run's end-of-run JSON line lands in /tmp/repl/NAME_sSEED.json.
set -eu
export OMP_NUM_THREADS=1 RPO_HOME=${RPO_HOME:-/tmp/rpohome_repl}
mkdir -p /tmp/repl
python -c 'import rpo; rpo.model_folder(rpo.parse_config([]))'   # build the tiny random model once, before the parallel runs
for s in 0 1 2; do
  echo "M16_s$s --batch 16 --seed $s"                                   # longest runs first
  for l in sft dpo; do echo "${l}_s$s --loss $l --seed $s"; done
  for e in both text image; do echo "rpo-${e}_s$s --loss rpo --embed $e --seed $s"; done
  for t in 0.1 0.25 1.0 4.0; do echo "tau${t}_s$s --tau $t --seed $s"; done    # tau 0.5 = rpo-both
  for M in 2 4; do echo "M${M}_s$s --batch $M --seed $s"; done                  # M 8 = rpo-both
done | xargs -P 2 -L 1 sh -c 'python rpo.py --max_steps 120 --lr 1e-5 --beta 5000 --eval_pairs 64 --eval_draws 8 \
  --save_every 100000 --sample_steps 0 --workers 0 --out /tmp/repl/$0 "$@" 2>/tmp/repl/$0.log | tail -n 1 > /tmp/repl/$0.json'
