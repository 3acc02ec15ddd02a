"""DFGPT on its own trunk (commit 7b1fc2b) vs DFGPT on the core Transformer: 50 training steps on
the same batches, with the same optimizer, levels and noise.

    git archive 7b1fc2b src | tar -x -C /tmp/old                       # the code before the move
    PYTHONPATH=/tmp/old/src python equivalence.py old tf /tmp/eq_old_tf   # and: old df /tmp/eq_old_df
    python equivalence.py new tf /tmp/eq_new_tf                          # and: new df /tmp/eq_new_df

`old` saves its initial weights under the new names; `new` reports whether the same seed gave the
same weights, then loads the old ones (so Diffusion Forcing starts from the same point) and trains.
Each writes OUT.json, the 50 losses; compare the two lists. DATA: tinyshakespeare.txt (env).
"""

import json
import os
import sys

import torch

from difflm.diffusion.gaussian import GaussianConfig
from difflm.models.dfgpt import DFGPT, DFGPTConfig

RENAMES = (  # old name -> new name
    ("wte.", "trunk.tok_emb."),
    ("wpe.", "trunk.pos_emb."),
    ("ln_f.", "trunk.norm_f."),
    ("lm_head.", "trunk.lm_head."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".c_attn.", ".qkv."),
    (".c_proj.", ".out_proj."),
)


def rename(key: str) -> str:
    for old, new in RENAMES:
        key = key.replace(old, new)
    return "trunk." + key if key.startswith("blocks.") else key


def main() -> None:
    which, mode, out = sys.argv[1:4]
    if which == "old":
        from difflm.train.tasks import AutoregressiveTask as Autoregressive

        from difflm.systems.forcing import DiffusionForcingTask as DiffusionForcing
    else:
        from difflm.train.objectives import AutoregressiveObjective as Autoregressive
        from difflm.train.objectives import DiffusionForcingObjective as DiffusionForcing
    torch.set_num_threads(1)
    text = open(os.environ.get("DATA", "../shared/data/tinyshakespeare.txt")).read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text[:200000]])
    df = mode == "df"
    cfg = DFGPTConfig(
        vocab_size=len(chars), block_size=64, n_layer=4, n_head=4, n_embd=128,
        use_diffusion_forcing=df, gaussian=GaussianConfig(),
    )  # fmt: skip
    torch.manual_seed(1337)
    model = DFGPT(cfg)
    if which == "old":
        torch.save({rename(k): v for k, v in model.state_dict().items()}, out + ".init.pt")
    else:
        init = torch.load(out.replace("new", "old") + ".init.pt", weights_only=True)
        own = model.state_dict()
        print("same init from the same seed:", all(torch.equal(own[k], v) for k, v in init.items() if k in own))
        model.load_state_dict(init, strict=False)
    task = DiffusionForcing(cfg.gaussian, cfg.n_embd) if df else Autoregressive()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = task.prepare({"input_ids": torch.stack([data[s : s + 64] for s in starts])}, g)
        loss, _ = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    json.dump(losses, open(out + ".json", "w"))
    print(which, mode, losses[0], losses[-1])


if __name__ == "__main__":
    main()
