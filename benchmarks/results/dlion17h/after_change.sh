#!/bin/bash
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
T="nice -n 5 .venv/bin/python benchmarks/tools17/after_change.py"
K="strategy.options.lockstep_slack=0.1"
row() { name=$1; shift; echo -n "$name:"; for s in 0 1 2; do r=$($T "$@" train.lr=0.2 train.seed=$s train.max_time=5 2>/dev/null | head -1); echo -n " [$r]"; done; echo; }
row "keptin b0.9" microcloud-dynamic $K
row "keptin bw-only" microcloud-dynamic $K "dynamics.capacity=[]"
row "keptin cap-only" microcloud-dynamic $K "dynamics.bandwidth=[]"
row "default rank0->0.5" microcloud-dynamic "dynamics.capacity=[{worker: 0, step: {at_s: 1.0, to: 0.5}}]"
row "keptin lr x0.5" microcloud-dynamic --scale 0.5 $K
row "keptin lr x0.33" microcloud-dynamic --scale 0.33 $K
row "keptin b0.8" microcloud-dynamic --momentum 0.8 $K
row "keptin b0.7" microcloud-dynamic --momentum 0.7 $K
row "keptin b0.7 ranks01" microcloud-dynamic --momentum 0.7 --ranks 0,1 $K
row "keptin b0.7 ranks0123" microcloud-dynamic --momentum 0.7 --ranks 0,1,2,3 $K
row "keptin b0.7 until1.6" microcloud-dynamic --momentum 0.7 --until 1.6 $K
row "default b0.9" microcloud-dynamic
row "default b0.7" microcloud-dynamic --momentum 0.7
row "hetero default b0.7 from0" microcloud-hetero --from 0 --momentum 0.7
