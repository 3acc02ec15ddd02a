"""In-process A/B of SGDD batch-1 decoding with the decoder's linear layers in int8 (stop 32:
`SGDD.int8_`, models/quantize.py) against the same checkpoint in float32; see alternating.py for
how the two are timed.

    OMP_NUM_THREADS=T python docs/results/sgdd/int8_ab.py RUN T
"""

import copy
import sys

from alternating import compare, held_out

from difflm.evaluate.sgdd_decode import decode_vectors

pre, vectors = held_out(sys.argv[1], int(sys.argv[2]))
int8 = copy.copy(pre)
int8.model = copy.deepcopy(pre.model)
int8.model.int8_()


def fp32(vectors, scale):
    return decode_vectors(pre, vectors, cfg_scale=scale)


def quantized(vectors, scale):
    return decode_vectors(int8, vectors, cfg_scale=scale)


compare({"fp32": fp32, "int8": quantized}, vectors)
