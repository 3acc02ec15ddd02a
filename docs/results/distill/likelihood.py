"""What distillation costs as a model of Shakespeare: the ELBO bound (K = 4, 4 draws of t) and the
exact left-to-right NLL of BD3 K=4 before and after, on the validation split of Tiny Shakespeare
and of the distillation text (the AR model's greedy continuations), both in windows of 288
characters (the distilled model's context), fp32: the whole Tiny Shakespeare split (387 windows) and
the first 416 windows (13 batches of 32) of the greedy text's (~1,200). Run from the repository root:

    OMP_NUM_THREADS=2 python docs/results/distill/likelihood.py BEFORE AFTER GREEDY_TEXT > likelihood.json
"""

import dataclasses
import json
import sys

from difflm.data.blocks import text_blocks
from difflm.evaluate.likelihood import elbo_nll, left_to_right_nll
from difflm.pretrained import load_pretrained

BATCHES = 13  # of 32 windows: all of Tiny Shakespeare's 387, a third of the greedy text's

before, after, greedy = sys.argv[1:4]
out = {}
for name, path in (("before", before), ("after", after)):
    pre = load_pretrained(path)
    tok = pre.tokenizer
    for corpus, source in (("shakespeare", "shakespeare"), ("greedy", greedy)):
        data = dataclasses.replace(pre.config.data, path=source, block_size=288, cache_dir=".cache/difflm")
        _, _, val = text_blocks(data, tok)
        ids = {"mask_token_id": tok.mask_token_id, "vocab_size": tok.vocab_size, "block_length": 4, "max_batches": BATCHES}
        out[f"{name}/{corpus}"] = {
            "checkpoint": path,
            "windows": min(len(val), BATCHES * 32),
            "elbo_nll": elbo_nll(pre.model, val, progress=False, **ids),
            "left_to_right_nll": left_to_right_nll(pre.model, val, progress=False, **ids),
        }
        print(name, corpus, out[f"{name}/{corpus}"], file=sys.stderr)
print(json.dumps(out, indent=1))
