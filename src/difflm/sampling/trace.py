"""A record of how a sample was revealed, and three ways to watch it: terminal, GIF, HTML page.

`Trace` holds the state after every step of the diffusion engine (or every token of the
autoregressive baseline). Renderers take one trace, a `decode_token` function (list of ids ->
one string per id) and the batch row to show. Positions still masked are drawn as a placeholder
and the positions revealed at that step are highlighted; the prompt is shown in every frame.
"""

from __future__ import annotations

import glob
import html
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

DecodeFn = Callable[[list[int]], list[str]]


@dataclass
class TraceStep:
    """The state after one step (all tensors on the CPU)."""

    tokens: Tensor  # [B, L]
    revealed: Tensor  # [B, L] bool: positions whose token appeared or changed at this step
    confidence: Tensor  # [B, L] float: confidence of revealed positions, 0 elsewhere
    block: int
    step: int


@dataclass
class Trace:
    """Every step of one sampling run. `mask_token_id` marks positions not yet generated."""

    initial: Tensor  # [B, L] state before the first step
    fill: Tensor  # [B, L] bool: positions the sampler generates (the rest is prompt / context)
    attention_mask: Tensor  # [B, L] 1 real token, 0 padding (never shown)
    mask_token_id: int
    steps: list[TraceStep] = field(default_factory=list)

    def record(self, tokens: Tensor, before: Tensor, confidence: Tensor, block: int, step: int) -> None:
        """Append the state `tokens` [B, L] reached from `before` [B, L] at this step."""
        revealed = (tokens != before) & (tokens != self.mask_token_id)  # [B, L]
        conf = torch.where(revealed, confidence.float(), torch.zeros_like(confidence, dtype=torch.float))
        self.steps.append(TraceStep(tokens.cpu().clone(), revealed.cpu(), conf.cpu(), block, step))


@dataclass
class _Frame:
    """One row's state, pad positions dropped: per token its id and flags."""

    ids: list[int]
    masked: list[bool]
    new: list[bool]
    prompt: list[bool]
    label: str


def _row_frames(trace: Trace, row: int) -> list[_Frame]:
    keep = trace.attention_mask[row].bool()
    prompt = (~trace.fill[row].bool())[keep].tolist()

    def frame(tokens: Tensor, new: Tensor, label: str) -> _Frame:
        ids = tokens[row][keep].tolist()
        masked = [i == trace.mask_token_id for i in ids]
        return _Frame(ids, masked, new[row][keep].tolist(), prompt, label)

    steps = trace.steps
    return [
        frame(s.tokens, s.revealed, f"step {i + 1}/{len(steps)}  block {s.block}")
        for i, s in enumerate(steps)
    ]


def _vocab(frames: Sequence[_Frame], decode_token: DecodeFn) -> dict[int, str]:
    ids = sorted({i for f in frames for i, m in zip(f.ids, f.masked, strict=True) if not m})
    return dict(zip(ids, decode_token(ids), strict=True))


# ---------------------------------------------------------------------------------------------
# terminal


def render_live(
    trace: Trace, decode_token: DecodeFn, row: int = 0, *, delay: float = 0.15, console=None
) -> None:
    """Replay the trace in the terminal with rich.Live (masked = dim placeholder, new = highlighted)."""
    from rich.live import Live
    from rich.text import Text

    frames = _row_frames(trace, row)
    vocab = _vocab(frames, decode_token)

    def text(f: _Frame) -> Text:
        out = Text(f.label + "\n", style="italic")
        for i, masked, new, prompt in zip(f.ids, f.masked, f.new, f.prompt, strict=True):
            if masked:
                out.append("░░", style="dim")
            else:
                out.append(vocab[i], style="bold black on yellow" if new else ("cyan" if prompt else ""))
        return out

    with Live(text(frames[0]), console=console, auto_refresh=False) as live:
        for f in frames:
            live.update(text(f), refresh=True)
            time.sleep(delay)


# ---------------------------------------------------------------------------------------------
# GIF

_FONT_GLOBS = (
    "/usr/share/fonts/**/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/**/NotoSansCJK*.ttc",
    "/usr/share/fonts/**/DejaVuSans.ttf",
    "/usr/share/fonts/**/NotoSans-Regular.ttf",
)
_COLORS = {"bg": "white", "text": "#222222", "prompt": "#1f5fa8", "new": "#ffe066", "mask": "#d0d0d0"}


def load_font(size: int = 16) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A system font with wide coverage (Noto CJK, else DejaVu), else Pillow's default font.

    Pillow's default font has no CJK glyphs; those render as boxes unless Noto CJK is installed.
    """
    for pattern in _FONT_GLOBS:
        for path in sorted(glob.glob(pattern, recursive=True)):
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.load_default(size)


def _layout(f: _Frame, vocab: dict[int, str], font, width: int, line_h: int) -> list[tuple]:
    """Word-wrap one frame: (x, y, w, text | None, style) per piece; text None = mask placeholder."""
    pieces, x, y, pad = [], 0, 0, 4
    mask_w = int(font.getlength("mmm"))
    for i, masked, new, prompt in zip(f.ids, f.masked, f.new, f.prompt, strict=True):
        style = "new" if new else ("prompt" if prompt else "text")
        parts = [None] if masked else vocab[i].split("\n")
        for k, part in enumerate(parts):
            if k > 0:  # an explicit newline inside the token
                x, y = 0, y + line_h
            w = mask_w if part is None else int(font.getlength(part))
            if x + w > width - 2 * pad and x > 0:
                x, y = 0, y + line_h
            pieces.append((x + pad, y, w, part, style))
            x += w + (2 if part is None else 0)
    return pieces


def _panel(
    pieces: list[tuple], font, size: tuple[int, int], title: str, label: str, line_h: int
) -> Image.Image:
    img = Image.new("RGB", size, _COLORS["bg"])
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), f"{title}  {label}".strip(), fill="#777777", font=font)
    top = line_h + 6
    for x, y, w, text, style in pieces:
        if text is None:
            draw.rounded_rectangle((x, top + y + 3, x + w, top + y + line_h - 3), 3, fill=_COLORS["mask"])
            continue
        if style == "new":
            draw.rectangle((x, top + y, x + w, top + y + line_h - 1), fill=_COLORS["new"])
        draw.text((x, top + y), text, fill=_COLORS["prompt" if style == "prompt" else "text"], font=font)
    return img


def render_side_by_side_gif(
    traces: Sequence[Trace],
    titles: Sequence[str],
    decode_token: DecodeFn | Sequence[DecodeFn],
    path: str | Path,
    row: int = 0,
    *,
    width: int = 480,
    font_size: int = 16,
    frame_ms: int = 150,
    hold_frames: int = 10,
) -> Path:
    """Animate several traces next to each other (e.g. diffusion vs autoregressive).

    Frame f shows step f of every trace; a trace with fewer steps holds its last state. The last
    frame is then held `hold_frames` more times. A thin progress bar along the bottom advances
    every frame, which also keeps Pillow from merging identical hold frames into one.
    """
    decoders = [decode_token] * len(traces) if callable(decode_token) else list(decode_token)
    font = load_font(font_size)
    line_h = int(font_size * 1.4)
    panels = []
    for trace, decode in zip(traces, decoders, strict=True):
        frames = _row_frames(trace, row)
        vocab = _vocab(frames, decode)
        panels.append([(_layout(f, vocab, font, width, line_h), f.label) for f in frames])
    lines = max(p[1] for panel in panels for pieces, _ in panel for p in pieces) + line_h
    size = (width, lines + 2 * line_h + 12)
    n_steps = max(len(p) for p in panels)
    n_frames = n_steps + hold_frames
    images = []
    for f in range(n_frames):
        img = Image.new("RGB", (width * len(panels), size[1]), _COLORS["bg"])
        for j, (panel, title) in enumerate(zip(panels, titles, strict=True)):
            pieces, label = panel[min(f, len(panel) - 1)]
            img.paste(_panel(pieces, font, size, title, label, line_h), (j * width, 0))
        bar = round(img.width * (f + 1) / n_frames)
        ImageDraw.Draw(img).rectangle((0, img.height - 3, bar, img.height - 1), fill="#999999")
        images.append(img)
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


def render_gif(
    trace: Trace, decode_token: DecodeFn, path: str | Path, row: int = 0, *, hold_frames: int = 10, **kwargs
) -> Path:
    """One frame per step plus `hold_frames` copies of the final state; every frame the same size."""
    return render_side_by_side_gif([trace], [""], decode_token, path, row, hold_frames=hold_frames, **kwargs)


# ---------------------------------------------------------------------------------------------
# HTML

_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}
#text{white-space:pre-wrap;line-height:1.8;border:1px solid #ddd;padding:1em;min-height:6em}
.prompt{color:#1f5fa8}.new{background:#ffe066}
.mask{display:inline-block;width:1.6em;height:.9em;background:#d0d0d0;border-radius:3px;margin:0 1px}
</style></head><body>
<h3>__TITLE__</h3>
<button id="play">play</button> <input id="slider" type="range" min="0" value="0" style="width:60%">
<span id="label"></span>
<div id="text"></div>
<script id="trace-data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("trace-data").textContent);
const slider = document.getElementById("slider"), text = document.getElementById("text");
slider.max = data.frames.length - 1;
function show(i) {
  const f = data.frames[i];
  text.replaceChildren();
  f.tokens.forEach((id, k) => {
    const s = document.createElement("span");
    if (id === data.mask) { s.className = "mask"; }
    else {
      s.textContent = data.vocab[id];
      s.className = f.revealed[k] ? "new" : (data.prompt[k] ? "prompt" : "");
      if (f.revealed[k]) s.title = "confidence " + f.confidence[k].toFixed(3);
    }
    text.appendChild(s);
  });
  document.getElementById("label").textContent = f.label;
  slider.value = i;
}
let timer = null;
document.getElementById("play").onclick = () => {
  if (timer) { clearInterval(timer); timer = null; return; }
  let i = Number(slider.value) >= data.frames.length - 1 ? 0 : Number(slider.value);
  timer = setInterval(() => { show(i); if (++i >= data.frames.length) { clearInterval(timer); timer = null; } }, 200);
};
slider.oninput = () => show(Number(slider.value));
show(0);
</script></body></html>
"""


def render_html(
    trace: Trace, decode_token: DecodeFn, path: str | Path, row: int = 0, *, title: str = "difflm sample"
) -> Path:
    """A self-contained page (inline CSS/JS, no network) with a step slider and a play button."""
    frames = _row_frames(trace, row)
    keep = trace.attention_mask[row].bool()
    data = {
        "mask": trace.mask_token_id,
        "vocab": {str(k): v for k, v in _vocab(frames, decode_token).items()},
        "prompt": frames[0].prompt if frames else [],
        "frames": [
            {
                "label": f.label,
                "tokens": f.ids,
                "revealed": f.new,
                "confidence": [round(c, 4) for c in s.confidence[row][keep].tolist()],
            }
            for f, s in zip(frames, trace.steps, strict=True)
        ],
    }
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    page = _HTML.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
