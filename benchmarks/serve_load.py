"""Load test of `difflm serve` on loopback: N requests one at a time, then all at once.

    python benchmarks/serve_load.py                      # a random tiny char model, 64 requests
    python benchmarks/serve_load.py --checkpoint runs/shakespeare_char --requests 64

Requests mix prompt lengths, max_tokens, temperatures and streaming / non-streaming, each with
its own seed. Every request is first run alone (sequentially); then all are sent concurrently.
The script checks that no request is lost or mixed up (each concurrent output equals the same
request's output alone) and prints p50 / p99 latency and aggregate completion tokens/s for both
phases. Without --checkpoint it builds an untrained model: that measures the serving machinery,
not the text. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from difflm.config import RunConfig, to_dict
from difflm.data.tokenizers import CharTokenizer
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.serve.app import build_app, serve_in_thread
from difflm.serve.models import load_served
from difflm.serve.protocol import Defaults
from difflm.train.checkpoint import save_checkpoint

PROMPTS = ["to be, or not", "the king", "a", "what light through yonder window breaks", "my lord, i"]


def random_checkpoint(out: Path) -> Path:
    """An untrained 4-layer, 128-wide char transformer with 160 positions."""
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,;:!?'\n")
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=tok.vocab_size,
        block_size=160,
        n_layer=4,
        n_head=4,
        n_embd=128,
        mask_token_id=tok.mask_token_id,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(40)  # confidences spread out as in a trained model, not all ~1/V
    run = to_dict(RunConfig(task="masked_diffusion", model=cfg))
    return save_checkpoint(out, 0, model=model, run_config=run, trainer_state={"step": 0}, tokenizer=tok)


def request_bodies(n: int) -> list[dict]:
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": (16, 32, 64)[i % 3],
            "temperature": (0.0, 1.0)[i // 3 % 2],
            "seed": 1000 + i,
            "stream": i % 4 == 1,
        }
        for i in range(n)
    ]


def call(url: str, body: dict) -> tuple[float, str, int]:
    """(latency s, text, completion tokens) of one request."""
    start = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read().decode()
    if body["stream"]:
        events = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")]
        text = "".join(e["choices"][0]["text"] for e in events)
        n = body["max_tokens"]  # a stream carries no usage; the tiny model never stops early
    else:
        reply = json.loads(raw)
        text, n = reply["choices"][0]["text"], reply["usage"]["completion_tokens"]
    return time.perf_counter() - start, text, n


def one_at_a_time(url: str, bodies: list[dict]) -> tuple[float, list]:
    start = time.perf_counter()
    results = [call(url, b) for b in bodies]
    return time.perf_counter() - start, results


def all_at_once(url: str, bodies: list[dict]) -> tuple[float, list]:
    results: list = [None] * len(bodies)

    def run(i: int) -> None:
        results[i] = call(url, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def summary(name: str, wall: float, results: list) -> dict:
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {
        "mode": name,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tok_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(p99, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=None, help="step or run folder (default: a random tiny model)"
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or random_checkpoint(Path(tmp) / "tiny")
        served = load_served(path, dtype=args.dtype)
        app = build_app(
            [served], Defaults(block_length=16), max_batch=args.max_batch, max_queue=4 * args.requests
        )
        running = serve_in_thread(app)  # 127.0.0.1, a free port
        batcher = app.state.server.batcher
        try:
            bodies = request_bodies(args.requests)
            seq_wall, alone = one_at_a_time(running.url, bodies)
            seq_passes = batcher.forward_passes
            conc_wall, together = all_at_once(running.url, bodies)
            conc_passes = batcher.forward_passes - seq_passes
        finally:
            running.stop()
    mismatched = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if a[1] != b[1]]
    rows = [
        {**summary("one at a time", seq_wall, alone), "forward_passes": seq_passes},
        {**summary("all at once", conc_wall, together), "forward_passes": conc_passes},
    ]
    print(f"model {served.name} ({args.dtype}), {args.requests} requests, max_batch {args.max_batch}")
    columns = ("mode", "requests", "wall_s", "tokens", "tok_per_s", "p50_s", "p99_s", "forward_passes")
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in columns) + " |")
    print(f"outputs equal to the same request alone: {len(bodies) - len(mismatched)}/{len(bodies)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "mismatched": mismatched}, indent=2))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
