"""The quality reference of the gen-1024 benchmark: full vanilla decoding (no cache, one character a
step, semi-autoregressive blocks) of the 4 batch-1 prompts of `benchmarks/sampling.py --solo-prompts 4`,
judged by the AR model. Untimed (the benchmark times vanilla on its first two blocks only, so its
gen-ppl column covers those). `--batch 16`: instead the 16 prompts of its batch-16 setting, decoded
as one batch as it decodes them. Run from the repository root:

    OMP_NUM_THREADS=1 python docs/results/distill/vanilla_ref.py zoo/shakespeare_char_mdm_1k_distilled 64 [--batch 16]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from sampling import gen_ppl, prompts  # noqa: E402

from difflm.pretrained import load_pretrained  # noqa: E402
from difflm.sampling.unmask import SampleConfig, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("model_path")
p.add_argument("block", type=int)
p.add_argument("--batch", type=int, default=1, help="1: the 4 batch-1 prompts alone; N: N prompts as one batch")
args = p.parse_args()
G, P = 1024, 32
ROWS, model_path, block = (4 if args.batch == 1 else args.batch), args.model_path, args.block
torch.set_num_threads(1)
pre = load_pretrained(model_path)
judge = load_pretrained("zoo/shakespeare_char_ar_1k").model
ids = prompts(pre.tokenizer, ROWS, P)
config = SampleConfig(gen_length=G, steps=G, block_length=block)
with torch.no_grad():
    step = 1 if args.batch == 1 else ROWS
    tokens = torch.cat([generate(pre.model, ids[r : r + step], config).tokens for r in range(0, ROWS, step)])
    print(json.dumps({"model": model_path, "block_length": block, "prompts": ROWS, "gen_ppl": gen_ppl(judge, tokens, P, P + G)}))
