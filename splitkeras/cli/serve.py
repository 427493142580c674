"""`splitkeras serve SPLIT_DIR`: serve and train the server segment of a split over HTTP.

The one command module that imports the server (`server_app`, uvicorn), and only inside
`cmd_serve`: the core and the other commands run without them (tests/test_layering.py).

Example:
    $ splitkeras serve out --port 8000
    $ splitkeras serve out4 --segment middle_2 --port 8001              # a chain's second server
    $ splitkeras serve out4 --segment middle_1 --port 8000 --next http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from splitkeras.cli._common import add_unsafe

__all__ = ["register", "cmd_serve"]


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server_app import ServerSettings, create_app  # the server is optional for the core

    overrides = {k: v for k, v in {
        "key": args.key, "checkpoint_every": args.checkpoint_every,
        "step_ttl_seconds": args.step_ttl, "max_batch": args.max_batch,
        "segment": args.segment, "next_url": args.next, "next_key": args.next_key,
    }.items() if v is not None}
    settings = ServerSettings(split_dir=Path(args.split_dir),
                              unsafe_deserialization=args.unsafe_deserialization, **overrides)
    from server_app.segment_choice import choose_segment
    from splitkeras.manifest import Manifest

    manifest = Manifest.read(settings.split_dir)  # a wrong folder fails here, in one line
    served = choose_segment(manifest, settings.segment, settings.next_url)  # likewise a wrong --segment
    where = "SPLITKERAS_SERVER_KEY" if settings.key else settings.key_file
    chain = f", then {served.next} at {settings.next_url}" if served.next else ""
    print(f"splitkeras server for segment '{served.segment}'{chain} of {settings.split_dir} on "
          f"http://{args.host}:{args.port} (docs: /docs; key: {where})", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(sub: Any) -> None:
    """Add the `serve` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("serve", help="serve and train the server segment of a split over HTTP")
    p.add_argument("split_dir", help="a folder written by `splitkeras split`")
    p.add_argument("--segment", metavar="NAME", help="the server segment to serve (needed when the "
                   "split has several; one server process per server segment)")
    p.add_argument("--next", metavar="URL", help="in a chain of server segments: the server of the "
                   "next one, which this server calls (e.g. http://127.0.0.1:8001)")
    p.add_argument("--next-key", metavar="KEY", help="the next server's key (default: this server's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--key", help="session key (default: $SPLITKERAS_SERVER_KEY, else generated "
                   "into SPLIT_DIR/.splitkeras/server.key)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N applied steps (100)")
    p.add_argument("--step-ttl", type=float, help="seconds an unfinished step is kept (300)")
    p.add_argument("--max-batch", type=int, help="largest batch per request (256)")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    add_unsafe(p)
    p.set_defaults(func=cmd_serve)
