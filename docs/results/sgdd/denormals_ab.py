"""In-process A/B of SGDD batch-1 decoding with float32 denormals flushed to zero (stop 31: the
decoder's forwards run inside `sampling.denormals.flush_denormals`, new) against the same code
with flushing turned into a no-op (before); see alternating.py for how the two are timed.

    OMP_NUM_THREADS=T python docs/results/sgdd/denormals_ab.py RUN T
"""

import sys
from unittest import mock

import torch
from alternating import compare, held_out

from difflm.evaluate.sgdd_decode import decode_vectors

pre, vectors = held_out(sys.argv[1], int(sys.argv[2]))


def before(vectors, scale):
    with mock.patch.object(torch, "set_flush_denormal", lambda on: True):  # the flag stays off
        return decode_vectors(pre, vectors, cfg_scale=scale)


def new(vectors, scale):
    return decode_vectors(pre, vectors, cfg_scale=scale)


compare({"denormals kept": before, "flushed": new}, vectors)
