"""Choose where to cut: predicted training time per sample for each cut, from a cost model.

The model is deliberately simple, sequential (no overlap of compute and transfer)
and stated in full, so that a prediction can be checked by hand:

    time per sample = device compute + server compute + transfer + latency

    device compute = 3 x (forward FLOPs per sample on the device) / device FLOP/s
    server compute = 3 x (forward FLOPs per sample on the server) / server FLOP/s
                     (0 when no server speed is given: the server is taken as free)
    transfer       = 2 x (bytes per sample crossing) / bandwidth in bytes/s
                     (each activation goes one way, its gradient of the same size comes back)
    latency        = 2 x requests per step x one-way latency / batch size
                     (each request pays the latency once each way)

A training step costs about 3x a forward pass (forward, then gradients of the
activations and of the weights). FLOPs and crossing bytes come from
`splitkeras.profile.cut_candidates` (float32 bytes, halved for a float16 wire).

* One cut (`mode="labels_on_server"`): the head runs on the device and the rest
  on the server, which also holds the labels; one request per step (`train`).
* Two cuts (`mode="u_shaped"`): head and tail on the device, the middle on the
  server; two requests per step (`forward`, `backward`); the crossing bytes are
  those of both cuts. For a chain this is exact; with skip connections it is an
  upper bound (a tensor going from head to tail directly stays on the device but
  is counted), and a pair may not be a valid split at all: callers check the
  pairs they show with `splitkeras.graph.plan_segments`.

* A chain of hosts (`plan_chain`, `rank_chain`): any number of cuts, each segment
  on a host of a placement such as ["device", "edge", "cloud", "device"]; see
  `ChainConditions` for the hosts and links and `plan_chain` for the cost rule (the
  same three terms, per segment and per link).

Device memory, when a budget is given, counts the device's parameters at
`bytes_per_parameter` each (default 16: weights, gradients and Adam's two
moments in float32); activations are not counted.

Example:
    >>> from splitkeras.profile import CutCandidate
    >>> cut = CutCandidate("conv", "Conv2D", [[None, 4]], ["conv"], 16, 10, 90, 1_000, 9_000)
    >>> conditions = Conditions(bandwidth_bps=8e6, latency_s=0.0, device_flops=1e9)
    >>> plan = plan_single(cut, conditions)
    >>> round(plan.device_seconds, 9), round(plan.transfer_seconds, 9)
    (3e-06, 3.2e-05)
"""

from splitkeras.planning.chains import (
    ChainConditions,
    ChainPlan,
    Link,
    chain_device_only,
    plan_chain,
    rank_chain,
)
from splitkeras.planning.cuts import (
    Conditions,
    CutPlan,
    device_only,
    plan_pair,
    plan_single,
    rank_cuts,
)

__all__ = ["Conditions", "CutPlan", "plan_single", "plan_pair", "device_only", "rank_cuts",
           "Link", "ChainConditions", "ChainPlan", "plan_chain", "chain_device_only", "rank_chain"]
