"""In-process A/B of SGDD batch-1 decoding with the shortlist's vocabulary projection screened in
bfloat16 (stop 32: models/screen.py, new) against the float32 projection (before, the screen
switched off); see alternating.py for how the two are timed. With `int8`, both decode with int8
decoder weights.

    OMP_NUM_THREADS=T python docs/results/sgdd/screen_ab.py RUN T [int8]
"""

import sys
from unittest import mock

from alternating import compare, held_out

from difflm.evaluate.sgdd_decode import decode_vectors
from difflm.models import screen

pre, vectors = held_out(sys.argv[1], int(sys.argv[2]))
if sys.argv[3:] == ["int8"]:
    pre.model.int8_()


def before(vectors, scale):
    with mock.patch.object(screen, "_native_bf16", lambda: False):
        return decode_vectors(pre, vectors, cfg_scale=scale)


def new(vectors, scale):
    return decode_vectors(pre, vectors, cfg_scale=scale)


compare({"float32 projection": before, "bf16 screen": new}, vectors)
