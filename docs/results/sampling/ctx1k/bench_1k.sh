#!/bin/bash
source .venv/bin/activate  # run from the repository root
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
W=runs/ctx1k
python benchmarks/sampling.py --diffusion $W/mdm --ar $W/ar --bd3 $W/bd3_4 --gen-lengths 256 1024 --batches 1 16 \
    --block-length 32 --threads 1 --vanilla-blocks 2 --out $W/gen1024.md > $W/bench.log 2>&1
difflm eval $W/ar --json > $W/eval_ar.json 2> $W/eval_ar.err
difflm eval $W/mdm --json > $W/eval_mdm.json 2> $W/eval_mdm.err
difflm eval $W/bd3_4 --json --left-to-right > $W/eval_bd3_4.json 2> $W/eval_bd3_4.err
