"""`splitkeras plan MODEL`: rank the cut points by predicted training time per sample.

The cost model is `splitkeras.planning` (its docstring states it in full); the
inputs are `splitkeras inspect`'s numbers and the link and machine speeds given
on the command line.

Example:
    $ splitkeras plan model.keras --bandwidth 20 --latency 50 --device-flops 10 --top 5
    $ splitkeras plan model.keras --chain device,server,server,device --link 20,50 --link 1000,5 \
          --host-flops 10 --host-flops 100 --host-flops 1000
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from splitkeras.cli._common import CliError, add_unsafe, compress_spec, load

__all__ = ["register", "cmd_plan"]


def _positive(kind: type, what: str, allow_zero: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got '{text}'") from None
        if value < 0 or (value == 0 and not allow_zero) or value != value:
            bound = ">= 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"{what} must be {bound}, got '{text}'")
        return value

    return parse


def _link(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--link takes MBIT,MS (bandwidth,latency), got '{text}'")
    return (_positive(float, "--link bandwidth")(parts[0]),
            _positive(float, "--link latency", True)(parts[1]))


def register(sub: Any) -> None:
    """Add the `plan` subcommand to the `splitkeras` parser's subparsers."""
    p = sub.add_parser(
        "plan", help="rank cut points by predicted training time per sample",
        description="Rank single cuts and U-shaped pairs for one device-server link (--bandwidth, "
        "--latency, --device-flops), or, with --chain, cut sets over a chain of hosts: --chain "
        "device,server,server,device ranks every triple of cuts for device -> edge server -> cloud "
        "server -> device, with one --link per link of the line of hosts (device<->server1, "
        "server1<->server2) and one --host-flops per host (device, server1, server2). Each segment "
        "computes on its host; each cut costs its crossing bytes (activations on, gradients back) "
        "and the latency once each way on every link between the two hosts; a skip tensor is "
        "charged on every hop of the route it passes over. The search is exact (dynamic "
        "programming). The cost model is in splitkeras.planning.")
    p.add_argument("model", help="a .keras or .h5 model file")
    p.add_argument("--bandwidth", type=_positive(float, "--bandwidth"),
                   metavar="MBIT", help="link bandwidth in Mbit/s (each direction); required without --chain")
    p.add_argument("--latency", type=_positive(float, "--latency", True),
                   metavar="MS", help="one-way latency in milliseconds; required without --chain")
    p.add_argument("--device-flops", type=_positive(float, "--device-flops"), metavar="GFLOPS",
                   help="the device's sustained training speed in GFLOP/s; required without --chain")
    p.add_argument("--server-flops", type=_positive(float, "--server-flops"), metavar="GFLOPS",
                   help="the server's speed in GFLOP/s (default: server compute counted as free)")
    p.add_argument("--device-memory", type=_positive(float, "--device-memory"), metavar="MB",
                   help="leave out cuts whose device parameters need more (16 bytes/parameter)")
    p.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=32,
                   help="samples per step: the latency of a step is shared by them (32)")
    p.add_argument("--wire-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--compress", metavar="SPEC", type=compress_spec,
                   help="the codecs of `splitkeras train --compress`: each cut's bytes charged at "
                   "their ratio per direction (int8 1/4, topk:F 2F, topk:F+int8 1.25F of float32)")
    p.add_argument("--cuts", choices=["single", "pairs", "both"],
                   help="single cuts (labels on the server), pairs (U-shaped) or both (default)")
    p.add_argument("--chain", metavar="HOSTS",
                   help="comma-separated host of each segment, e.g. device,server,server,device "
                   "(names repeated in a row are different hosts: server1, server2; equal names "
                   "elsewhere are one host): rank cut sets over this chain of hosts")
    p.add_argument("--link", action="append", type=_link, metavar="MBIT,MS",
                   help="with --chain: one link's bandwidth in Mbit/s and one-way latency in ms; "
                   "once per link, in the order of the hosts (device<->server1, server1<->server2)")
    p.add_argument("--host-flops", action="append", type=_positive(float, "--host-flops"),
                   metavar="GFLOPS", help="with --chain: one host's training speed in GFLOP/s; once "
                   "per host, in the order they first appear (device, server1, server2)")
    p.add_argument("--top", type=_positive(int, "--top"), default=10, metavar="N",
                   help="show the N fastest plans (10)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    add_unsafe(p)
    p.set_defaults(func=cmd_plan, plan_usage_error=p.error)


def _print_json(model: Any, source: Any, assumptions: dict[str, Any], reference: Any, plans: Any) -> None:
    print(json.dumps({"model": model.name, "source": source, "assumptions": assumptions,
                      "device_only": reference.to_json(), "plans": [p.to_json() for p in plans]}, indent=2))


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}"


def cmd_plan(args: argparse.Namespace) -> int:
    from splitkeras.errors import SplitKerasError
    from splitkeras.graph import as_functional, plan_segments
    from splitkeras.planning import Conditions, device_only, rank_cuts
    from splitkeras.profile import cut_candidates

    if args.chain is not None:
        return _cmd_plan_chain(args)
    if args.link or args.host_flops:
        raise CliError("plan: --link and --host-flops describe a chain: give --chain HOSTS too")
    missing = [flag for flag, value in [("--bandwidth", args.bandwidth), ("--latency", args.latency),
                                        ("--device-flops", args.device_flops)] if value is None]
    if missing:
        args.plan_usage_error(f"the following arguments are required: {', '.join(missing)}")
    args.cuts = args.cuts or "both"
    model, source = load(args.model, args.unsafe_deserialization)
    conditions = Conditions(
        bandwidth_bps=args.bandwidth * 1e6, latency_s=args.latency / 1e3,
        device_flops=args.device_flops * 1e9,
        server_flops=None if args.server_flops is None else args.server_flops * 1e9,
        batch_size=args.batch_size, wire_dtype=args.compress or args.wire_dtype,
        device_memory_bytes=None if args.device_memory is None else args.device_memory * 1e6)
    candidates = cut_candidates(model)
    if not candidates:
        raise CliError(f"plan: model '{model.name}' has no layer that can be a cut")
    functional = as_functional(model)

    def valid_pair(first: str, second: str) -> bool:
        try:
            plan_segments(functional, [first, second])
        except SplitKerasError:
            return False
        return True

    plans = rank_cuts(candidates, conditions, single=args.cuts in ("single", "both"),
                      pairs=args.cuts in ("pairs", "both"), top=args.top, valid_pair=valid_pair)
    reference = device_only(candidates, conditions)
    assumptions = {
        "bandwidth_mbit_s": args.bandwidth, "latency_ms": args.latency,
        "device_gflops": args.device_flops, "server_gflops": args.server_flops,
        "device_memory_mb": args.device_memory, "batch_size": args.batch_size,
        "wire_dtype": args.compress or args.wire_dtype,
        "model": "seconds/sample = 3*device FLOPs/device FLOP/s + 3*server FLOPs/server FLOP/s "
                 "+ 2*crossing bytes*8/bandwidth + 2*requests per step*latency/batch size",
    }
    if args.format == "json":
        _print_json(model, source, assumptions, reference, plans)
        return 0
    server = "free" if args.server_flops is None else f"{args.server_flops:g} GFLOP/s"
    print(f"Model '{model.name}': {len(plans)} fastest plans, predicted ms per training sample")
    print(f"  link {args.bandwidth:g} Mbit/s, {args.latency:g} ms one way; device "
          f"{args.device_flops:g} GFLOP/s; server {server}; batch {args.batch_size}; "
          f"{args.compress or args.wire_dtype} on the wire")
    header = (f"{'#':>3} {'cut(s)':<40} {'mode':<8} {'total':>10} {'device':>10} {'server':>10} "
              f"{'transfer':>10} {'latency':>9} {'KB/sample':>10} {'dev params':>11}")
    print(header)
    print("-" * len(header))
    for index, plan in enumerate(plans, 1):
        mode = "U" if plan.mode == "u_shaped" else "1 cut"
        cuts = ", ".join(plan.cuts) + (" *" if plan.head_parameters == 0 else "")
        print(f"{index:>3} {cuts:<40.40} {mode:<8} {_ms(plan.total_seconds):>10} "
              f"{_ms(plan.device_seconds):>10} {_ms(plan.server_seconds):>10} "
              f"{_ms(plan.transfer_seconds):>10} {_ms(plan.latency_seconds):>9} "
              f"{plan.wire_bytes_per_sample / 1e3:>10.1f} {plan.device_parameters:>11,}")
    if any(plan.head_parameters == 0 for plan in plans):
        print("* the head has no parameters: the server receives the input (almost) raw, "
              "which split learning is meant to avoid.")
    print(f"Reference, whole model on the device: {_ms(reference.total_seconds)} ms per sample "
          f"({reference.device_parameters:,} parameters).")
    print("Model: 3 x forward FLOPs per side / its speed + 2 x crossing bytes / bandwidth + "
          "2 x requests per step x latency / batch (U-shaped: 2 requests; 1 cut: 1); no overlap.")
    return 0


def _cmd_plan_chain(args: argparse.Namespace) -> int:
    """`plan --chain`: rank cut sets over a chain of hosts (`splitkeras.planning.rank_chain`)."""
    from splitkeras.errors import SplitKerasError
    from splitkeras.graph import as_functional, plan_segments
    from splitkeras.planning import ChainConditions, Link, chain_device_only, rank_chain
    from splitkeras.profile import cut_candidates

    given = [flag for flag, value in [("--bandwidth", args.bandwidth), ("--latency", args.latency),
                                      ("--device-flops", args.device_flops),
                                      ("--server-flops", args.server_flops), ("--cuts", args.cuts)]
             if value is not None]
    if given:
        raise CliError(f"plan: --chain takes --link and --host-flops, not {', '.join(given)}")
    try:
        chain = ChainConditions(
            placement=tuple(args.chain.split(",")),
            links=tuple(Link(mbit * 1e6, ms / 1e3) for mbit, ms in args.link or ()),
            host_flops=tuple(f * 1e9 for f in args.host_flops or ()), batch_size=args.batch_size,
            wire_dtype=args.compress or args.wire_dtype,
            device_memory_bytes=None if args.device_memory is None else args.device_memory * 1e6)
    except ValueError as error:
        raise CliError(f"plan: {error} (give one --link per link and one --host-flops per "
                            "host, in order)") from None
    model, source = load(args.model, args.unsafe_deserialization)
    candidates = cut_candidates(model)
    count = len(chain.placement) - 1
    if len(candidates) < count:
        raise CliError(f"plan: model '{model.name}' has {len(candidates)} layer(s) that can be a "
                            f"cut; the chain needs {count}")
    functional = as_functional(model)

    def valid(cuts: tuple[str, ...]) -> bool:
        try:
            plan_segments(functional, list(cuts))
        except SplitKerasError:
            return False
        return True

    plans = rank_chain(candidates, chain, top=args.top, valid=valid)
    reference = chain_device_only(candidates, chain)
    hosts = chain.hosts
    names = [f"{a}<->{b}" for a, b in zip(hosts, hosts[1:])]
    assumptions = {
        "chain": list(chain.placement), "hosts": list(hosts),
        "links": [{"link": name, "bandwidth_mbit_s": mbit, "latency_ms": ms}
                  for name, (mbit, ms) in zip(names, args.link)],
        "host_gflops": dict(zip(hosts, args.host_flops)),
        "device_memory_mb": args.device_memory, "batch_size": args.batch_size,
        "wire_dtype": args.compress or args.wire_dtype,
        "model": "seconds/sample = sum over segments of 3*FLOPs/its host's FLOP/s + for each cut, on "
                 "every link between its two hosts: 2*crossing bytes*8/bandwidth + 2*latency/batch size",
    }
    if args.format == "json":
        _print_json(model, source, assumptions, reference, plans)
        return 0
    print(f"Model '{model.name}': {len(plans)} fastest cut sets for {' -> '.join(chain.placement)}, "
          "predicted ms per training sample")
    for name, (mbit, ms) in zip(names, args.link):
        print(f"  link {name}: {mbit:g} Mbit/s, {ms:g} ms one way")
    print("  hosts: " + ", ".join(f"{h} {g:g} GFLOP/s" for h, g in zip(hosts, args.host_flops))
          + f"; batch {args.batch_size}; {args.compress or args.wire_dtype} on the wire")
    header = (f"{'#':>3} {'cuts':<40} {'total':>10} " + " ".join(f"{h[:10]:>10}" for h in hosts)
              + " " + " ".join(f"{'link ' + str(i):>10}" for i in range(1, len(names) + 1))
              + f" {'KB/sample':>10} {'dev params':>11}")
    print(header)
    print("-" * len(header))
    for index, plan in enumerate(plans, 1):
        cuts = ", ".join(plan.cuts) + (" *" if plan.head_parameters == 0 else "")
        per_host = plan.host_seconds
        links = [t + lat for t, lat in zip(plan.link_transfer_seconds, plan.link_latency_seconds)]
        print(f"{index:>3} {cuts:<40.40} {_ms(plan.total_seconds):>10} "
              + " ".join(f"{_ms(per_host[h]):>10}" for h in hosts) + " "
              + " ".join(f"{_ms(t):>10}" for t in links)
              + f" {plan.wire_bytes_per_sample / 1e3:>10.1f} {plan.device_parameters:>11,}")
    if any(plan.head_parameters == 0 for plan in plans):
        print("* the head has no parameters: the next host receives the input (almost) raw.")
    print(f"Reference, whole model on the {hosts[0]}: {_ms(reference.total_seconds)} ms per sample.")
    print("Hosts: compute; link i: transfer + latency on it (" + ", ".join(
        f"{i} = {name}" for i, name in enumerate(names, 1)) + "). A tensor passing over several "
        "cuts is charged on each hop; no overlap.")
    return 0
