"""`difflm serve CKPT [CKPT2 ...]`: an OpenAI-compatible server and playground on one process."""

from __future__ import annotations

import argparse

from difflm.errors import DifflmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints", nargs="+", help="step or run folders; each is served under its run's name"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    parser.add_argument("--max-tokens", type=int, default=64, help="default max_tokens of a request")
    parser.add_argument("--block-length", type=int, default=32, help="default block length (0 = one block)")
    parser.add_argument("--max-batch", type=int, default=32, help="rows per engine batch")
    parser.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from difflm.serve.app import build_app
    except ImportError as err:
        raise DifflmError(
            f"serving needs the 'serve' extra ({err.name} missing): pip install 'difflm[serve]'"
        ) from None
    from difflm.serve.models import load_served
    from difflm.serve.protocol import Defaults

    for name in ("max_tokens", "max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise DifflmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    models = [load_served(path, args.device, args.dtype) for path in args.checkpoints]
    defaults = Defaults(max_tokens=args.max_tokens, block_length=args.block_length or None)
    app = build_app(models, defaults, args.max_batch, args.max_queue)
    print(f"serving {', '.join(m.name for m in models)}: playground at http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
