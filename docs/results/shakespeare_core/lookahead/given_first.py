"""The BD3 bound scored as the AR NLL is: positions 1..L-1 of each window given its first character.

The AR model's validation NLL predicts x[1:] from x[:-1] (L - 1 characters a window); the ELBO
bound of `difflm eval` scores all L, the first one with no context at all. Here the first
character of each window is never masked (a one-token prompt) and the sum is divided by L - 1,
with the same draws of t as `difflm eval` (4 per window, whole validation split, SUBS). Run from
the repository root:

    OMP_NUM_THREADS=1 python docs/results/shakespeare_core/lookahead/given_first.py CHECKPOINT
"""

import json
import math
import sys

import torch

from difflm.config import DiffusionConfig
from difflm.data.blocks import text_blocks
from difflm.pretrained import load_pretrained
from difflm.train.objectives import MaskedDiffusionObjective
from difflm.train.trainer import collate, step_generator

BATCH, DRAWS = 32, 4
pre = load_pretrained(sys.argv[1])
model = pre.model.eval()
_, _, val = text_blocks(pre.config.data, pre.tokenizer)
objective = MaskedDiffusionObjective(
    DiffusionConfig(loss="mdlm", block_length=pre.config.diffusion.block_length),
    mask_token_id=pre.tokenizer.mask_token_id,
    vocab_size=pre.tokenizer.vocab_size,
)
totals, count = {"bound": 0.0, "bound_given_first": 0.0}, 0
with torch.no_grad():
    for b in range(math.ceil(len(val) / BATCH)):
        batch = collate([val[i] for i in range(b * BATCH, min(len(val), (b + 1) * BATCH))])
        B, L = batch["input_ids"].shape
        for s in range(DRAWS):
            prepared = objective.prepare(batch, step_generator(0, b * DRAWS + s, salt=2))
            totals["bound"] += objective.loss(model, prepared)[0].item() * B
            prompted = {**batch, "prompt_lengths": torch.ones(B, dtype=torch.long)}
            prepared = objective.prepare(prompted, step_generator(0, b * DRAWS + s, salt=2))
            prepared.pop("loss_mask")  # the loss divides by B * L; the first token is never masked
            totals["bound_given_first"] += objective.loss(model, prepared)[0].item() * B * L / (L - 1)
            count += B
print(json.dumps({"checkpoint": sys.argv[1], **{k: v / count for k, v in totals.items()}}))
