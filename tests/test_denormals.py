"""Flushing denormals inside a decode: on inside, the caller's setting after, either way."""

import pytest
import torch

from difflm.sampling.denormals import SMALLEST_NORMAL, denormals_flushed, flush_denormals

# torch.set_flush_denormal returns whether this CPU can flush (x86 with SSE3 can)
pytestmark = pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")


@pytest.mark.parametrize("before", [False, True])
def test_flush_denormals_flushes_inside_and_restores_the_callers_setting(before):
    torch.set_flush_denormal(before)
    try:
        assert denormals_flushed() is before
        with flush_denormals():
            assert denormals_flushed()
            assert float(torch.tensor([SMALLEST_NORMAL]).mul(0.25)) == 0.0
        assert denormals_flushed() is before
    finally:
        torch.set_flush_denormal(False)


def test_flush_denormals_restores_after_an_error():
    torch.set_flush_denormal(False)
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("boom")
    assert not denormals_flushed()
    assert float(torch.tensor([SMALLEST_NORMAL]).mul(0.25)) > 0.0  # a denormal survives again
