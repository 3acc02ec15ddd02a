"""In-process A/B of SGDD batch-1 decoding in inference mode (stop 29: `decode_vectors` runs under
`torch.inference_mode()`, new) against plain `torch.no_grad()` (before); see alternating.py for
how the two are timed.

    OMP_NUM_THREADS=T python docs/results/sgdd/inference_mode_ab.py RUN T
"""

import sys

import torch
from alternating import compare, held_out

from difflm.evaluate.sgdd_decode import decode_vectors

pre, vectors = held_out(sys.argv[1], int(sys.argv[2]))


def before(vectors, scale):
    with torch.no_grad():
        return decode_vectors.__wrapped__(pre, vectors, cfg_scale=scale)  # the undecorated function


def new(vectors, scale):
    return decode_vectors(pre, vectors, cfg_scale=scale)


compare({"no_grad": before, "inference_mode": new}, vectors)
