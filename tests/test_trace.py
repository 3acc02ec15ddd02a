"""Trace recording and the GIF / HTML / terminal renderers."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from PIL import Image
from rich.console import Console

from difflm.sampling.trace import render_gif, render_html, render_live, render_side_by_side_gif
from difflm.sampling.unmask import SampleConfig, generate


def decode(ids: list[int]) -> list[str]:
    return [f" w{i}" if i % 5 else "\n" for i in ids]


@pytest.fixture
def traced(mock_denoiser):
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    cfg = SampleConfig(gen_length=10, steps=6, block_length=5)
    return generate(mock_denoiser(), ids, cfg, attention_mask=mask, trace=True)


def test_trace_records_every_step(traced):
    trace = traced.trace
    assert len(trace.steps) == 6 == traced.forward_passes
    assert [s.block for s in trace.steps] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(trace.steps[-1].tokens, traced.tokens)
    for s in trace.steps:
        assert s.tokens.device.type == "cpu" and s.tokens.shape == (2, 14)
        assert (s.confidence[s.revealed] > 0).all() and (s.confidence[~s.revealed] == 0).all()


def test_gif_frames(traced, tmp_path):
    path = render_gif(traced.trace, decode, tmp_path / "a.gif", row=0, hold_frames=4, width=200)
    with Image.open(path) as im:
        sizes = []
        for k in range(im.n_frames):
            im.seek(k)
            sizes.append(im.size)
        assert im.n_frames == 6 + 4
    assert len(set(sizes)) == 1 and sizes[0][0] == 200


def test_side_by_side_pads_shorter_trace(traced, mock_denoiser, tmp_path):
    short = generate(mock_denoiser(), torch.tensor([[3, 4]]), SampleConfig(gen_length=4, steps=2), trace=True)
    path = render_side_by_side_gif(
        [traced.trace, short.trace],
        ["diffusion", "short"],
        decode,
        tmp_path / "b.gif",
        hold_frames=3,
        width=160,
    )
    with Image.open(path) as im:
        assert im.n_frames == 6 + 3 and im.size[0] == 320


def test_html_contains_every_step(traced, tmp_path):
    path = render_html(traced.trace, decode, tmp_path / "a.html", row=0)
    page = path.read_text(encoding="utf-8")
    assert "<script src" not in page and "http" not in page  # self-contained
    data = json.loads(
        re.search(r'<script id="trace-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    )
    real = traced.trace.attention_mask[0].bool()
    assert len(data["frames"]) == len(traced.trace.steps)
    for frame, step in zip(data["frames"], traced.trace.steps, strict=True):
        assert frame["tokens"] == step.tokens[0][real].tolist()
        assert frame["revealed"] == step.revealed[0][real].tolist()
    assert all(data["vocab"][str(i)] == decode([i])[0] for i in traced.tokens[0][real].tolist())


def test_live_shows_final_text(traced):
    buffer = io.StringIO()
    render_live(
        traced.trace, decode, row=1, delay=0.0, console=Console(file=buffer, width=200, force_terminal=False)
    )
    final = "".join(decode(traced.tokens[1].tolist()))
    assert final.split("\n")[-1] in buffer.getvalue()
