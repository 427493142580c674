"""`splitkeras serve SPLIT_DIR`: serve and train the server segment of a split over HTTP.

The one command module that imports the server (`server_app`, uvicorn), and only inside
`cmd_serve`: the core and the other commands run without them (tests/test_layering.py).

Every mistake is one line before the server listens: flag values, the folder and segment,
the TLS files, plain HTTP beyond loopback without `--insecure`, another server of the same
segment, the segment's `.keras` file and the checkpoint (loaded before uvicorn starts).

Example:
    $ splitkeras serve out --port 8000
    $ splitkeras serve out4 --segment middle_2 --port 8001              # a chain's second server
    $ splitkeras serve out4 --segment middle_1 --port 8000 --next http://127.0.0.1:8001
    $ splitkeras serve out --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem
    $ splitkeras serve splitkeras-demo --device-page                    # open the printed /device/ URL
    $ splitkeras serve out --strategy mirrored --no-guard               # every local GPU (docs/scaling.md)
    $ TF_CONFIG='{"cluster": {"worker": ["a:2222", "b:2222"]}, "task": {"type": "worker", "index": 0}}' \
        splitkeras serve out --strategy multi-worker --no-guard
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitkeras.cli._common import CliError, add_unsafe

__all__ = ["register", "cmd_serve"]

# settings field -> the flag that sets it (for one-line messages about a bad value)
FLAGS = {"checkpoint_every": "--checkpoint-every", "step_ttl_seconds": "--step-ttl", "max_batch": "--max-batch",
         "max_pending_steps": "--max-pending-steps",
         "max_sessions": "--max-sessions", "session_ttl_seconds": "--session-ttl",
         "read_timeout_seconds": "--read-timeout", "guard_factor": "--guard-factor",
         "guard_warmup": "--guard-warmup", "guard_max_abs": "--guard-max-abs",
         "guard_max_weight": "--guard-max-weight", "max_grad_norm": "--max-grad-norm",
         "max_refused_steps": "--max-refused-steps", "aggregate": "--aggregate", "round_steps": "--round-steps",
         "round_quorum": "--round-quorum", "round_deadline_seconds": "--round-deadline",
         "round_norm_factor": "--round-norm-factor", "codecs": "--codecs", "strategy": "--strategy",
         "replicas": "--replicas", "collective_timeout_seconds": "--collective-timeout",
         "global_step_ms": "--global-step-ms",
         "batch_window_ms": "--batch-window-ms", "max_devices_per_batch": "--max-devices-per-batch",
         "batch_backward_timeout_seconds": "--batch-backward-timeout"}


def _settings(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from server_app import ServerSettings

    overrides = {k: v for k, v in {
        "key": args.key, "checkpoint_every": args.checkpoint_every,
        "step_ttl_seconds": args.step_ttl, "max_batch": args.max_batch, "max_sessions": args.max_sessions,
        "max_pending_steps": args.max_pending_steps,
        "session_ttl_seconds": args.session_ttl, "read_timeout_seconds": args.read_timeout,
        "guard_factor": args.guard_factor, "guard_warmup": args.guard_warmup,
        "guard_max_abs": args.guard_max_abs, "guard_max_weight": args.guard_max_weight,
        "max_grad_norm": args.max_grad_norm, "max_refused_steps": args.max_refused_steps,
        "segment": args.segment, "next_url": args.next, "next_key": args.next_key,
        "cors_origins": args.cors_origin, "aggregate": args.aggregate, "round_quorum": args.round_quorum,
        "round_deadline_seconds": args.round_deadline, "round_norm_factor": args.round_norm_factor,
        "codecs": args.codecs, "strategy": args.strategy, "replicas": args.replicas,
        "collective_timeout_seconds": args.collective_timeout, "global_step_ms": args.global_step_ms,
        "batch_window_ms": args.batch_window_ms, "max_devices_per_batch": args.max_devices_per_batch,
        "batch_backward_timeout_seconds": args.batch_backward_timeout,
    }.items() if v is not None}
    if (args.replicas is not None) and args.strategy != "mirrored":
        raise CliError("serve: --replicas needs --strategy mirrored")
    if args.round_steps is not None:
        if args.aggregate in (None, "off"):
            raise CliError("serve: --round-steps needs --aggregate fedavg or --aggregate relay")
        overrides["round_steps"] = None if args.round_steps == "epoch" else args.round_steps
    if args.device_page:
        overrides["device_page"] = True
    if args.no_guard:
        overrides["guard"] = False
    try:
        return ServerSettings(split_dir=Path(args.split_dir), unsafe_deserialization=args.unsafe_deserialization,
                              **overrides)
    except ValidationError as error:  # a value from a SPLITKERAS_* variable (flags are checked by argparse)
        problem = error.errors()[0]
        field = ".".join(str(p) for p in problem.get("loc", ()))
        where = FLAGS.get(field, field)
        raise CliError(f"serve: {where} (or SPLITKERAS_{field.upper()}): {problem.get('msg')}, got "
                       f"{problem.get('input')!r}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server_app import create_app  # the server is optional for the core
    from server_app.launch import ServerLock, check_bind, check_port, check_tls, load_service, uvicorn_config
    from server_app.segment_choice import choose_segment
    from splitkeras.manifest import Manifest

    _log_to_stderr(args.log_level)
    settings = _settings(args)
    if settings.strategy != "off":  # before any other TensorFlow op, as MultiWorkerMirroredStrategy needs
        _start_strategy(settings)
    check_tls(args.tls_cert, args.tls_key)
    check_bind(args.host, tls=args.tls_cert is not None, insecure=args.insecure)
    check_port(args.host, args.port)
    manifest = Manifest.read(settings.split_dir)  # a wrong folder fails here, in one line
    served = choose_segment(manifest, settings.segment, settings.next_url)  # likewise a wrong --segment
    if settings.device_page:
        _check_device_page(settings, manifest)
    with ServerLock(settings.split_dir, served.segment):
        service = load_service(settings)  # a bad .keras or checkpoint: one line, before uvicorn
        where = "SPLITKERAS_SERVER_KEY" if settings.key else settings.key_file
        chain = f", then {served.next} at {settings.next_url}" if served.next else ""
        scheme = "https" if args.tls_cert else "http"
        print(f"splitkeras server for segment '{served.segment}'{chain} of {settings.split_dir} on "
              f"{scheme}://{args.host}:{args.port} (docs: /docs; key: {where})", flush=True)
        if settings.device_page:  # the key rides in the fragment, which the browser never sends
            print(f"device page: {scheme}://{args.host}:{args.port}/device/#key={service.server_key.value}",
                  flush=True)
        config = uvicorn_config(create_app(settings, service), args.host, args.port,
                                read_timeout=settings.read_timeout_seconds, tls_cert=args.tls_cert,
                                tls_key=args.tls_key, log_level=args.log_level)
        uvicorn.Server(config).run()
    return 0


def _check_device_page(settings: Any, manifest: Any) -> None:
    from server_app.device_page import PageNotBuilt, check_page_dir, missing_bundles

    try:
        check_page_dir(settings.resolved_device_page_dir)
    except PageNotBuilt as error:
        raise CliError(f"serve: {error}") from None
    missing = missing_bundles(settings.split_dir, manifest)
    if missing:
        raise CliError(f"serve: --device-page: device segment '{missing[0]}' has no TF.js bundle in "
                       f"{settings.split_dir} for the page to train; split again without --no-tfjs "
                       "(`splitkeras split` writes the bundles by default)")


def _number(kind: Callable[[str], Any], low: float, inclusive: bool = True,
            high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: a finite number >= low (or > low), <= high."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole' if kind is int else 'a'} number, got "
                                             f"{text!r}") from None
        if not math.isfinite(value) or (value < low if inclusive else value <= low) or value > high:
            sign = ">=" if inclusive else ">"
            top = f" and <= {high:g}" if math.isfinite(high) else ""
            raise argparse.ArgumentTypeError(f"expected a finite number {sign} {low:g}{top}, got {text!r}")
        return value
    return parse


def _start_strategy(settings: Any) -> None:
    """Create the `--strategy` at program start; a failure is one line."""
    from server_app.launch import ServerStartError
    from splitkeras import distributed
    from splitkeras.errors import SplitKerasError

    try:
        distributed.start(settings.strategy, settings.replicas, settings.collective_timeout_seconds)
    except SplitKerasError:
        raise
    except Exception as error:  # TensorFlow could not make the strategy (a port in use, a bad address)
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ServerStartError(f"--strategy {settings.strategy}: TensorFlow could not start it "
                               f"({type(error).__name__}{': ' + text if text else ''}).") from None


def _round_steps(text: str) -> int | str:
    """An argparse type: a whole number >= 1, or 'epoch'."""
    return "epoch" if text == "epoch" else _number(int, 1)(text)


def server_environment() -> None:
    """Before TensorFlow loads: oneDNN's own allocator keeps every buffer it ever held in a
    pool (the RSS of a server never comes down after a burst of abandoned sessions); the
    system allocator gives them back (malloc_trim after an idle sweep). Same arithmetic,
    bitwise; `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0` in the environment keeps the pool.

    glibc is told to serve buffers up to 32 MiB from its heap and to trim the heap only past
    256 MiB free (or when the idle sweep asks): otherwise every large tensor is a fresh
    mmap whose pages fault in anew, which doubles the cost of a guarded update's snapshot."""
    import ctypes
    import os
    import sys

    os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
    if sys.platform.startswith("linux") and os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "1":
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass


def _log_to_stderr(level: str) -> None:
    import logging

    logger = logging.getLogger("splitkeras")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        logger.addHandler(handler)


def register(sub: Any) -> None:
    """Add the `serve` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("serve", help="serve and train the server segment of a split over HTTP")
    p.add_argument("split_dir", help="a folder written by `splitkeras split`")
    p.add_argument("--segment", metavar="NAME", help="the server segment to serve (needed when the "
                   "split has several; one server process per server segment)")
    p.add_argument("--next", metavar="URL", help="in a chain of server segments: the server of the "
                   "next one, which this server calls (e.g. http://127.0.0.1:8001)")
    p.add_argument("--next-key", metavar="KEY", help="the next server's key (default: this server's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1); another "
                   "than loopback needs --tls-cert/--tls-key, or --insecure")
    p.add_argument("--port", type=_number(int, 0, high=65535), default=8000)
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP on a non-loopback --host (e.g. "
                   "behind a proxy that terminates TLS)")
    p.add_argument("--key", help="session key (default: $SPLITKERAS_SERVER_KEY, else generated "
                   "into SPLIT_DIR/.splitkeras/server.key)")
    p.add_argument("--checkpoint-every", type=_number(int, 1), help="checkpoint every N applied steps (100)")
    p.add_argument("--step-ttl", type=_number(float, 0, inclusive=False),
                   help="seconds an unfinished step is kept (300)")
    p.add_argument("--max-batch", type=_number(int, 1), help="largest batch per request (256)")
    p.add_argument("--max-pending-steps", type=_number(int, 1, high=64), metavar="N",
                   help="forwards of one session that may wait for their backwards at once: a device "
                   "may pipeline up to N steps (4; 1: no pipelining)")
    p.add_argument("--batch-window-ms", type=_number(float, 0), help="micro-batching across devices: the "
                   "forwards arriving within N ms run as one union forward, their backwards as one update, the "
                   "mean of the group's steps (0: off, the default; docs/protocol.md, Micro-batching)")
    p.add_argument("--max-devices-per-batch", type=_number(int, 1), help="a micro-batch closes once K "
                   "sessions' forwards are in (8)")
    p.add_argument("--batch-backward-timeout", type=_number(float, 0, inclusive=False),
                   help="seconds a micro-batch waits for its members' backwards after the first one (10); "
                   "the rest expire (step_expired)")
    p.add_argument("--max-sessions", type=_number(int, 1), help="sessions held at once (1024); then a new "
                   "one replaces the least recently used idle one")
    p.add_argument("--session-ttl", type=_number(float, 0, inclusive=False),
                   help="seconds without a request before a session is closed (3600)")
    p.add_argument("--read-timeout", type=_number(float, 0, inclusive=False),
                   help="seconds a request's head may take, and a pause in its body (30)")
    p.add_argument("--guard-factor", type=_number(float, 1, inclusive=False),
                   help="refuse a tensor over this times its running scale (1000; docs/protocol.md, Guards)")
    p.add_argument("--guard-warmup", type=_number(int, 0), help="accepted requests per tensor before "
                   "--guard-factor applies (10)")
    p.add_argument("--guard-max-abs", type=_number(float, 0, inclusive=False),
                   help="the largest |value| a tensor of a step may hold (1e10)")
    p.add_argument("--guard-max-weight", type=_number(float, 0, inclusive=False),
                   help="the largest |value| a trainable weight may take (1e6)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let pages of ORIGIN (e.g. https://app.example.org) call the server from a "
                   "browser (CORS); repeatable; off by default")
    p.add_argument("--device-page", action="store_true",
                   help="also serve a device page at /device/: a browser tab trains the device segments "
                   "(the digits set for the `splitkeras demo` split); the URL with the key is printed; "
                   "needs the built page (`npm --prefix mobile_export run build:page`)")
    p.add_argument("--max-grad-norm", type=_number(float, 0, inclusive=False),
                   help="clip the gradients a device sends to this global L2 norm (default: no clip)")
    p.add_argument("--max-refused-steps", type=_number(int, 1),
                   help="close a session after this many refused steps (10)")
    p.add_argument("--codecs", metavar="LIST", help="the codec families sessions may use, comma-separated "
                   "(default: all of float32,float16,bfloat16,int8,topk; docs/protocol.md, Codecs)")
    p.add_argument("--aggregate", choices=["off", "fedavg", "relay"],
                   help="rounds of device aggregation: fedavg averages the devices' segments each round "
                   "(SplitFed), relay hands them from one device to the next (default off)")
    p.add_argument("--round-steps", type=_round_steps, metavar="N|epoch",
                   help="steps a device trains per round, or 'epoch' (default epoch)")
    p.add_argument("--round-quorum", type=_number(int, 1), help="uploads that close a fedavg round (2)")
    p.add_argument("--round-deadline", type=_number(float, 0, inclusive=False),
                   help="seconds after its first upload a fedavg round closes with what came (60)")
    p.add_argument("--round-norm-factor", type=_number(float, 1, inclusive=False),
                   help="refuse an upload whose update norm is over this times the median of accepted "
                   "ones (10)")
    p.add_argument("--strategy", choices=["off", "mirrored", "multi-worker"],
                   help="train the segment on tf.distribute: mirrored over this host's GPUs (or --replicas "
                   "logical CPUs), multi-worker over the hosts of TF_CONFIG (default off; docs/scaling.md)")
    p.add_argument("--replicas", type=_number(int, 1), help="--strategy mirrored: how many devices (default: "
                   "every GPU, else 1 CPU; without GPUs, N logical CPU devices)")
    p.add_argument("--collective-timeout", type=_number(float, 0, inclusive=False),
                   help="--strategy multi-worker: seconds a global step waits for a peer before the worker "
                   "is reported lost (30)")
    p.add_argument("--global-step-ms", type=_number(float, 0, inclusive=False),
                   help="--strategy multi-worker: an idle worker joins a global step this often (50)")
    p.add_argument("--no-guard", action="store_true", help="turn the guards off (not for a shared server)")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    add_unsafe(p)
    p.set_defaults(func=cmd_serve, before_tensorflow=server_environment)
