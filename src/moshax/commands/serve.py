"""``moshax serve``: talk to a Moshi checkpoint over Kyutai's chat protocol.

    moshax serve --checkpoint LM_CKPT --mimi-checkpoint MIMI_CKPT [--tokenizer SPM.model] \
        [--host 127.0.0.1] [--port 8998] [--slots 4] [--temperature 0.8] [--top-k 250] \
        [--text-temperature 0.7] [--text-top-k 25] [--seed 0] \
        [--auth-token T | --auth-token-file F] [--allow-origin https://example.org ...] \
        [--max-message-bytes 1048576] [--send-queue 64] [--gather-ms 20]

Serves the page at ``/``, the websocket ``/api/chat``, ``/health`` and ``/metrics``; ``--slots``
conversations share one batched, jitted step (docs/serve.md). Stops cleanly on SIGTERM/Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moshax.config import ConfigError


def _token(args) -> str | None:
    if args.auth_token and args.auth_token_file:
        raise ConfigError("give --auth-token or --auth-token-file, not both")
    if args.auth_token_file:
        path = Path(args.auth_token_file)
        if not path.is_file():
            raise FileNotFoundError(f"--auth-token-file not found: {path}")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"--auth-token-file {path} is empty")
        return token
    return args.auth_token or None


def _require_serve_extra() -> None:
    import importlib.util

    missing = [m for m in ("aiohttp", "sphn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"moshax serve needs {', '.join(missing)}: pip install 'moshax[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from moshax.commands.generate import _sampling, _tokenizer
    from moshax.serve.access import exposure_warning, normalize_origins

    if args.slots < 1:
        raise ConfigError(f"--slots {args.slots}: must be >= 1")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: must be in 1..65535")
    token = _token(args)
    try:
        origins = normalize_origins(args.allow_origin)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sampling = _sampling(args)
    sp = _tokenizer(args.tokenizer)

    from moshax.checkpoint.model import open_checkpoint
    from moshax.commands.generate import load_lm_and_codec

    ckpt = open_checkpoint(args.checkpoint)
    if ckpt.model_kind not in ("moshi", "lm"):
        raise ConfigError(f"--checkpoint {args.checkpoint} holds a {ckpt.model_kind} model; moshax serve takes "
                          f"a Moshi LM")
    lm, _, mimi = load_lm_and_codec(ckpt, args.mimi_checkpoint)

    from aiohttp import web

    from moshax.serve.server import make_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warning = exposure_warning(args.host, token)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = make_app(lm, mimi, sp, slots=args.slots, sampling=sampling, seed=args.seed, auth_token=token,
                   allow_origins=origins, max_message_bytes=args.max_message_bytes, outbox_frames=args.send_queue,
                   gather_seconds=args.gather_ms / 1e3)
    print(f"moshax serve: {args.slots} slots; open http://{args.host}:{args.port}/"
          + ("?token=..." if token else ""), flush=True)
    web.run_app(app, host=args.host, port=args.port, print=lambda m: print(m, flush=True),
                handle_signals=True, shutdown_timeout=5.0)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a Moshi checkpoint over Kyutai's chat protocol (+ a web page)")
    p.add_argument("--checkpoint", required=True, help="Moshi LM checkpoint (moshax dir or train workdir)")
    p.add_argument("--mimi-checkpoint", required=True, help="Mimi checkpoint dir or Kyutai .safetensors")
    p.add_argument("--tokenizer", help="sentencepiece model: text as pieces (else <id>)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--slots", type=int, default=4, help="concurrent conversations (the decoder's batch)")
    p.add_argument("--temperature", type=float, default=0.8, help="audio temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=250, help="audio top-k (0 = all)")
    p.add_argument("--text-temperature", type=float, default=0.7, help="text temperature (0 = greedy)")
    p.add_argument("--text-top-k", type=int, default=25, help="text top-k (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auth-token", help="required from clients of /api/chat and /metrics (?token= or Bearer)")
    p.add_argument("--auth-token-file", help="read the token from this file")
    p.add_argument("--allow-origin", action="append", default=[],
                   help="another page origin allowed to open /api/chat (repeatable); the server's own always is")
    p.add_argument("--max-message-bytes", type=int, default=1 << 20, help="largest websocket message accepted")
    p.add_argument("--send-queue", type=int, default=64, help="messages queued per client before frames drop")
    p.add_argument("--gather-ms", type=float, default=20.0,
                   help="how long a step waits for every active conversation's frame (batching)")
    p.set_defaults(fn=cmd_serve)
