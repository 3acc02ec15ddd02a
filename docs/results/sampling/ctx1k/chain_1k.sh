#!/bin/bash
# Long-context (1056) Tiny Shakespeare models for the gen-1024 sampling benchmark, fine-tuned from the 128-context AR run.
source .venv/bin/activate  # run from the repository root
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
W=runs/ctx1k
AR=runs/reproduce/shakespeare_long-cpu/ar/checkpoints/best
COMMON="model.n_layer=4 model.n_head=4 model.n_embd=128 model.dropout=0.0 data.block_size=1056 data.path=shakespeare data.cache_dir=$W/cache train.batch_size=2 train.precision=fp32 train.device=cpu train.warmup_steps=50 train.eval_every=100 train.eval_batches=10 train.progress=false"
difflm train shakespeare_char_ar $COMMON train.lr=5e-4 train.min_lr=5e-5 train.max_steps=600 train.save_every=600 train.init_from=$AR train.output_dir=$W/ar > $W/ar.log 2>&1
difflm train shakespeare_char $COMMON model.logits_shift=1 train.lr=5e-4 train.min_lr=5e-5 train.max_steps=500 train.save_every=500 train.init_from=runs/reproduce/shakespeare_long-cpu/mdm_from_ar/checkpoints/step-4000 train.output_dir=$W/mdm > $W/mdm.log 2>&1
# zoo/shakespeare_char_bd3_4_from_ar was then its 2000-step version (git show cef5eda:zoo/shakespeare_char_bd3_4_from_ar/...); today's is trained further from the result (zoo/README.md)
difflm train shakespeare_char $COMMON diffusion.block_length=4 diffusion.t_eps=0.3 diffusion.t_max=0.8 model.logits_shift=1 train.lr=5e-4 train.min_lr=5e-5 train.max_steps=500 train.save_every=500 train.init_from=zoo/shakespeare_char_bd3_4_from_ar train.output_dir=$W/bd3_4 > $W/bd3_4.log 2>&1
