"""A/B of SGDD batch-1 decoding between two checkouts of difflm (stop 27: a leaner forward).

Runs the same decode (held-out sentences one at a time, plain decoding, CFG 0 and 2) under an old
and a new `src/` in separate processes, alternating their order round by round; each process
decodes every sentence `--repeats` times and keeps its fastest time, and each sentence keeps its
fastest over the rounds (the least disturbed by anything else on the machine). Prints ms per
sentence of each, their ratio, and in how many sentences the two wrote the same text.
Run from the repository root with a finished SGDD run and the old commit checked out beside it:

    git worktree add /tmp/old 272304d
    python docs/results/sgdd/lean_ab.py --run RUN --old-src /tmp/old/src --threads 1
"""

import argparse
import json
import os
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch

    from difflm.evaluate.sgdd_decode import decode_vectors
    from difflm.pretrained import load_pretrained
    from difflm.systems.sgdd import build_examples, load_encoder, split_examples

    torch.set_num_threads(args.threads)
    pre = load_pretrained(args.run)
    pairs = split_examples(pre.config, "val")[: args.sentences]
    data = build_examples(pairs, load_encoder(pre.config.model.encoder), pre.tokenizer, pre.config, 128)
    out = {"mean_tokens": float(data.lengths.float().mean())}
    with torch.no_grad():
        decode_vectors(pre, data.vectors[:1], cfg_scale=0.0)  # warm-up
        for scale in (0.0, 2.0):
            ms, texts = [float("inf")] * len(pairs), [None] * len(pairs)
            for _ in range(args.repeats):
                for i in range(len(pairs)):
                    start = time.perf_counter()
                    texts[i] = decode_vectors(pre, data.vectors[i : i + 1], cfg_scale=scale)[0]
                    ms[i] = min(ms[i], 1000 * (time.perf_counter() - start))
            out[str(scale)] = {"ms": ms, "texts": texts}
    print(json.dumps(out))


def run(src: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", "--run", args.run, "--threads", str(args.threads)]
    cmd += ["--sentences", str(args.sentences), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, help="an SGDD run folder or checkpoint")
    p.add_argument("--old-src", help="the old checkout's src/ (the new one is this repository's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sentences", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    trees = {"old": args.old_src, "new": os.path.join(os.path.dirname(__file__), "..", "..", "..", "src")}
    best: dict = {}
    for r in range(args.rounds):
        for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
            result = run(os.path.abspath(trees[name]), args)
            for scale in ("0.0", "2.0"):
                mine = best.setdefault((name, scale), {"ms": result[scale]["ms"], "texts": result[scale]["texts"]})
                mine["ms"] = [min(a, b) for a, b in zip(mine["ms"], result[scale]["ms"], strict=True)]
    n = len(best[("old", "0.0")]["ms"])
    print(f"{args.run}: {n} held-out sentences (mean {result['mean_tokens']:.1f} tokens), batch 1, "
          f"{args.threads} thread(s), fp32, fastest of {args.rounds} x {args.repeats} decodes each")
    for scale in ("0.0", "2.0"):
        ms = {name: sum(best[(name, scale)]["ms"]) / n for name in trees}
        same = sum(a == b for a, b in zip(best[("old", scale)]["texts"], best[("new", scale)]["texts"], strict=True))
        print(f"CFG {float(scale):g}: old {ms['old']:.1f} ms, new {ms['new']:.1f} ms per sentence "
              f"({ms['old'] / ms['new']:.2f}x); same text in {same}/{n} sentences")


if __name__ == "__main__":
    main()
