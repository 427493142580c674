"""The cut planner's cost model against numbers computed by hand, and the `plan` command.

The tiny model: x(4) -> Dense(3) "d1" -> Dense(2) "d2" -> Dense(1) "out".
  d1: 15 params, 2*4*3 = 24 forward FLOPs, 3 floats (12 bytes) cross after it
  d2:  8 params, 2*3*2 = 12 FLOPs,          2 floats (8 bytes)
  out: 3 params, 2*2*1 = 4 FLOPs           (model total: 26 params, 40 FLOPs)
Conditions: 8 kbit/s (1000 bytes/s), 0.1 s latency, device 100 FLOP/s, server
1000 FLOP/s, batch 10.
  cut d1:  device 3*24/100 = 0.72, server 3*16/1000 = 0.048, transfer 2*12/1000 = 0.024,
           latency 2*1*0.1/10 = 0.02                               -> 0.812
  cut d2:  1.08 + 0.012 + 0.016 + 0.02                             -> 1.128
  d1+d2 (U): device 3*(24+4)/100 = 0.84, server 3*12/1000 = 0.036,
           transfer 2*(12+8)/1000 = 0.04, latency 2*2*0.1/10 = 0.04 -> 0.956
  device only: 3*40/100                                            -> 1.2

Chains of hosts (three cuts, device -> server1 -> server2 -> device) are computed by
hand on a five-layer model below, before their tests.
"""

from __future__ import annotations

import json

import keras
import pytest

from splitkeras.cli import main
from splitkeras.graph import plan_segments
from splitkeras.planning import (
    ChainConditions,
    Conditions,
    chain_device_only,
    device_only,
    plan_chain,
    plan_pair,
    plan_single,
    rank_chain,
    rank_cuts,
)
from splitkeras.profile import CutCandidate, cut_candidates


def tiny_model() -> keras.Model:
    inputs = keras.Input((4,), name="x")
    x = keras.layers.Dense(3, name="d1")(inputs)
    x = keras.layers.Dense(2, name="d2")(x)
    outputs = keras.layers.Dense(1, name="out")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    model.compile(optimizer="sgd", loss="mse")
    return model


CONDITIONS = Conditions(bandwidth_bps=8e3, latency_s=0.1, device_flops=100.0,
                        server_flops=1000.0, batch_size=10)


@pytest.fixture(scope="module")
def cuts() -> dict:
    return {c.layer: c for c in cut_candidates(tiny_model())}


def test_profile_numbers_the_hand_computation_uses(cuts: dict) -> None:
    assert sorted(cuts) == ["d1", "d2"]
    assert (cuts["d1"].bytes_per_sample, cuts["d1"].head_parameters, cuts["d1"].head_flops,
            cuts["d1"].tail_flops) == (12, 15, 24, 16)
    assert (cuts["d2"].bytes_per_sample, cuts["d2"].head_parameters, cuts["d2"].head_flops,
            cuts["d2"].tail_flops) == (8, 23, 36, 4)


def test_single_cut_matches_hand_computation(cuts: dict) -> None:
    plan = plan_single(cuts["d1"], CONDITIONS)
    assert plan.mode == "labels_on_server" and plan.cuts == ("d1",)
    assert plan.device_seconds == pytest.approx(0.72)
    assert plan.server_seconds == pytest.approx(0.048)
    assert plan.transfer_seconds == pytest.approx(0.024)
    assert plan.latency_seconds == pytest.approx(0.02)
    assert plan.total_seconds == pytest.approx(0.812)
    assert plan.wire_bytes_per_sample == 24
    assert plan_single(cuts["d2"], CONDITIONS).total_seconds == pytest.approx(1.128)


def test_pair_matches_hand_computation(cuts: dict) -> None:
    plan = plan_pair(cuts["d1"], cuts["d2"], CONDITIONS)
    assert plan.mode == "u_shaped" and plan.cuts == ("d1", "d2")
    assert plan.device_seconds == pytest.approx(0.84)
    assert plan.server_seconds == pytest.approx(0.036)
    assert plan.transfer_seconds == pytest.approx(0.04)
    assert plan.latency_seconds == pytest.approx(0.04)
    assert plan.total_seconds == pytest.approx(0.956)
    assert plan.device_parameters == 15 + 3
    assert plan.head_parameters == 15
    with pytest.raises(ValueError, match="must come before"):
        plan_pair(cuts["d2"], cuts["d1"], CONDITIONS)


def test_device_only_reference(cuts: dict) -> None:
    reference = device_only(list(cuts.values()), CONDITIONS)
    assert reference.total_seconds == pytest.approx(1.2)
    assert reference.device_parameters == 26 and reference.wire_bytes_per_sample == 0


def test_ranking_order_float16_free_server_and_memory(cuts: dict) -> None:
    candidates = list(cuts.values())
    ranked = rank_cuts(candidates, CONDITIONS, pairs=True)
    assert [p.cuts for p in ranked] == [("d1",), ("d1", "d2"), ("d2",)]
    assert [p.cuts for p in rank_cuts(candidates, CONDITIONS, pairs=True, top=1)] == [("d1",)]
    assert [p.cuts for p in rank_cuts(candidates, CONDITIONS, single=False, pairs=True)] == [("d1", "d2")]
    # float16 halves the bytes: transfer of cut d1 is 0.012 s
    half = Conditions(8e3, 0.1, 100.0, 1000.0, batch_size=10, wire_dtype="float16")
    assert plan_single(cuts["d1"], half).transfer_seconds == pytest.approx(0.012)
    # codecs per direction: int8 both ways a quarter (0.006 s), int8 up and 5% top-k+int8 down
    # (0.25 + 0.0625) / 2 of float32's bytes
    quarter = Conditions(8e3, 0.1, 100.0, 1000.0, batch_size=10, wire_dtype="int8")
    assert plan_single(cuts["d1"], quarter).transfer_seconds == pytest.approx(0.006)
    mixed = Conditions(8e3, 0.1, 100.0, 1000.0, batch_size=10, wire_dtype="forward=int8,backward=topk:0.05+int8")
    assert plan_single(cuts["d1"], mixed).transfer_seconds == pytest.approx(0.024 * 0.15625)
    # no server speed: server compute is free
    free = Conditions(8e3, 0.1, 100.0, batch_size=10)
    assert plan_single(cuts["d1"], free).total_seconds == pytest.approx(0.812 - 0.048)
    # 300 bytes at 16 bytes/parameter: d1 (240) and the pair (288) fit, d2 (368) does not
    small = Conditions(8e3, 0.1, 100.0, 1000.0, batch_size=10, device_memory_bytes=300)
    assert [p.cuts for p in rank_cuts(candidates, small, pairs=True)] == [("d1",), ("d1", "d2")]
    assert len(rank_cuts(candidates, small, pairs=True, include_unfit=True)) == 3
    # a refused pair is skipped
    assert [p.cuts for p in rank_cuts(candidates, CONDITIONS, pairs=True,
                                      valid_pair=lambda a, b: False)] == [("d1",), ("d2",)]


@pytest.mark.parametrize("kwargs, message", [
    ({"bandwidth_bps": 0}, "bandwidth"), ({"latency_s": -1}, "latency"),
    ({"device_flops": 0}, "device FLOP/s"), ({"wire_dtype": "float8"}, "wire dtype"),
    ({"batch_size": 0}, "batch size"),
])
def test_conditions_refuse_nonsense(kwargs: dict, message: str) -> None:
    base = dict(bandwidth_bps=1e6, latency_s=0.0, device_flops=1e9)
    with pytest.raises(ValueError, match=message):
        Conditions(**{**base, **kwargs})


def test_plan_command_json_and_table(tmp_path, capsys) -> None:
    path = tmp_path / "tiny.keras"
    tiny_model().save(path)
    argv = ["plan", str(path), "--bandwidth", "0.008", "--latency", "100", "--device-flops",
            "1e-7", "--server-flops", "1e-6", "--batch-size", "10"]
    assert main([*argv, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["cuts"] for p in data["plans"]] == [["d1"], ["d1", "d2"], ["d2"]]
    assert data["plans"][0]["total_seconds"] == pytest.approx(0.812)
    assert data["device_only"]["total_seconds"] == pytest.approx(1.2)
    assert main([*argv, "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "d1" in out and "whole model on the device" in out


def test_plan_command_usage_errors_are_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "tiny.keras"
    tiny_model().save(path)
    assert main(["plan", str(path), "--bandwidth", "0", "--latency", "1", "--device-flops", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bandwidth must be > 0" in err


# ---- chains of hosts ------------------------------------------------------------------------------
# The chain model: x(4) -> Dense(4) "d1" -> Dense(3) "d2" -> Dense(2) "d3" -> Dense(2) "d4" -> Dense(1) "out".
#   forward FLOPs d1 2*4*4 = 32, d2 2*4*3 = 24, d3 2*3*2 = 12, d4 2*2*2 = 8, out 2*2*1 = 4 (80 in all)
#   params        d1 20, d2 15, d3 8, d4 6, out 3 (52); bytes crossing after d1 16, d2 12, d3 8, d4 8
# Chain device -> server1 -> server2 -> device; link 1 device<->server1 8 kbit/s (1000 B/s), 0.1 s;
# link 2 server1<->server2 80 kbit/s (10000 B/s), 0.01 s; hosts 100, 1000, 10000 FLOP/s; batch 10.
# The hop server2 -> device crosses link 2 then link 1.
# Cuts d1, d2, d3: segments d1 | d2 | d3 | d4+out on device | server1 | server2 | device
#   compute  3*32/100 = 0.96, 3*24/1000 = 0.072, 3*12/10000 = 0.0036, 3*12/100 = 0.36   -> 1.3956
#   link 1   bytes 2*16 (d1) + 2*8 (d3) = 48: transfer 48/1000 = 0.048, latency 2*2*0.1/10 = 0.04
#   link 2   bytes 2*12 (d2) + 2*8 (d3) = 40: transfer 40/10000 = 0.004, latency 2*2*0.01/10 = 0.004
#   total                                                                              -> 1.4916
# The other triples, the same way: d1,d2,d4 1.254; d1,d3,d4 1.2856; d2,d3,d4 1.9256.
# Device only: 3*80/100 = 2.4.


def chain_model() -> keras.Model:
    inputs = keras.Input((4,), name="x")
    x = inputs
    for name, units in [("d1", 4), ("d2", 3), ("d3", 2), ("d4", 2)]:
        x = keras.layers.Dense(units, name=name)(x)
    outputs = keras.layers.Dense(1, name="out")(x)
    model = keras.Model(inputs, outputs, name="chain5")
    model.compile(optimizer="sgd", loss="mse")
    return model


CHAIN = ChainConditions(placement=("device", "server", "server", "device"),
                        links=((8e3, 0.1), (8e4, 0.01)), host_flops=(100.0, 1000.0, 10000.0),
                        batch_size=10)


@pytest.fixture(scope="module")
def chain_cuts() -> dict:
    return {c.layer: c for c in cut_candidates(chain_model())}


@pytest.fixture(scope="module")
def chain_model_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("chain") / "chain5.keras"
    chain_model().save(path)
    return str(path)


def test_chain_profile_numbers_the_hand_computation_uses(chain_cuts: dict) -> None:
    assert list(chain_cuts) == ["d1", "d2", "d3", "d4"]
    assert [chain_cuts[n].bytes_per_sample for n in chain_cuts] == [16, 12, 8, 8]
    assert [chain_cuts[n].head_flops for n in chain_cuts] == [32, 56, 68, 76]
    assert [chain_cuts[n].head_parameters for n in chain_cuts] == [20, 35, 43, 49]


def test_chain_hosts_and_links_from_the_placement() -> None:
    assert CHAIN.placement == ("device", "server1", "server2", "device")
    assert CHAIN.hosts == ("device", "server1", "server2")
    assert [CHAIN.hop_links(k) for k in (1, 2, 3)] == [[0], [1], [0, 1]]
    twice = ChainConditions(("device", "server", "device", "server", "device"), [(1e6, 0.0)], [1.0, 2.0])
    assert twice.hosts == ("device", "server") and twice.hop_links(4) == [0]
    with pytest.raises(ValueError, match="ambiguous"):
        ChainConditions(("device", "server", "server", "device", "server"), [(1, 0)] * 2, [1.0] * 3)
    with pytest.raises(ValueError, match=r"3 hosts and 2 link\(s\) \(device<->server1, "
                                         r"server1<->server2\); 1 link\(s\) given"):
        ChainConditions(CHAIN.placement, [(8e3, 0.1)], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"3 hosts \(device, server1, server2\); 2 FLOP/s given"):
        ChainConditions(("device", "server", "server", "device"), [(1, 0)] * 2, [1.0, 2.0])
    with pytest.raises(ValueError, match="link bandwidth must be > 0"):
        ChainConditions(("device", "server"), [(0, 0.1)], [1.0, 2.0])


def test_chain_cost_of_a_triple_matches_hand_computation(chain_cuts: dict) -> None:
    plan = plan_chain([chain_cuts["d1"], chain_cuts["d2"], chain_cuts["d3"]], CHAIN)
    assert plan.mode == "chain" and plan.cuts == ("d1", "d2", "d3")
    assert plan.segment_flops == (32, 24, 12, 12)
    assert plan.segment_seconds == pytest.approx((0.96, 0.072, 0.0036, 0.36))
    assert plan.link_wire_bytes_per_sample == (48, 40)
    assert plan.link_transfer_seconds == pytest.approx((0.048, 0.004))
    assert plan.link_latency_seconds == pytest.approx((0.04, 0.004))
    assert plan.total_seconds == pytest.approx(1.4916)
    assert plan.host_seconds == pytest.approx({"device": 1.32, "server1": 0.072, "server2": 0.0036})
    assert plan.device_parameters == 20 + 6 + 3 and plan.head_parameters == 20
    assert chain_device_only(list(chain_cuts.values()), CHAIN).total_seconds == pytest.approx(2.4)
    with pytest.raises(ValueError, match="must come before"):
        plan_chain([chain_cuts["d2"], chain_cuts["d1"], chain_cuts["d3"]], CHAIN)
    with pytest.raises(ValueError, match="needs 3 cut"):
        plan_chain([chain_cuts["d1"], chain_cuts["d2"]], CHAIN)


def test_chain_with_one_server_gives_the_single_and_pair_numbers(cuts: dict) -> None:
    u_shaped = ChainConditions(("device", "server", "device"), [(8e3, 0.1)], [100.0, 1000.0], batch_size=10)
    assert plan_chain([cuts["d1"], cuts["d2"]], u_shaped).total_seconds == pytest.approx(
        plan_pair(cuts["d1"], cuts["d2"], CONDITIONS).total_seconds)
    single = ChainConditions(("device", "server"), [(8e3, 0.1)], [100.0, 1000.0], batch_size=10)
    assert plan_chain([cuts["d1"]], single).total_seconds == pytest.approx(0.812)


def test_chain_ranking_all_triples_and_a_very_slow_link(chain_cuts: dict) -> None:
    candidates = list(chain_cuts.values())
    ranked = rank_chain(candidates, CHAIN)
    assert [p.cuts for p in ranked] == [("d1", "d2", "d4"), ("d1", "d3", "d4"), ("d1", "d2", "d3"),
                                        ("d2", "d3", "d4")]
    assert [p.total_seconds for p in ranked] == pytest.approx([1.254, 1.2856, 1.4916, 1.9256])
    # device<->server1 at 8 bit/s (1 byte/s) carries the first cut and the last: 2 x (12 + 8)
    # bytes for d2, d3, d4 against 2 x (16 + 8) or more for any triple that starts at d1
    slow = ChainConditions(CHAIN.placement, [(8.0, 0.1), (8e4, 0.01)], CHAIN.host_flops, batch_size=10)
    best = rank_chain(candidates, slow, top=1)
    assert [p.cuts for p in best] == [("d2", "d3", "d4")]
    assert best[0].link_transfer_seconds[0] == pytest.approx(40.0)
    # refused cut sets are skipped; the memory budget (16 bytes/parameter) leaves out big devices
    assert [p.cuts for p in rank_chain(candidates, CHAIN, top=2, valid=lambda cuts: "d2" not in cuts)] \
        == [("d1", "d3", "d4")]
    small = ChainConditions(CHAIN.placement, CHAIN.links, CHAIN.host_flops, batch_size=10,
                            device_memory_bytes=16 * 30)
    assert [p.device_parameters for p in rank_chain(candidates, small)] == [23, 23, 29]


def test_chain_skip_tensor_is_charged_on_every_link_it_crosses() -> None:
    """x -> a(4) -> b(3) -> c(2) -> cat([c, a]) -> d(2) -> out: `a` skips from the device's head
    to `cat` on server2, so device -> server1 -> server2 carry it."""
    inputs = keras.Input((4,), name="x")
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(3, name="b")(a)
    c = keras.layers.Dense(2, name="c")(b)
    cat = keras.layers.Concatenate(name="cat")([c, a])
    d = keras.layers.Dense(2, name="d")(cat)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(d), name="skip")
    rows = {r.layer: r for r in cut_candidates(model)}
    assert (rows["b"].bytes_per_sample, rows["c"].bytes_per_sample, rows["cat"].bytes_per_sample) \
        == (12 + 16, 8 + 16, 24)  # b and c each with a's 16 bytes passing over the cut
    graph, segments = plan_segments(model, ["b", "c", "cat"])
    assert [graph.tensor_name(t) for t in segments[2].inputs] == ["a", "c"]  # server2 reads a from the device
    plan = plan_chain([rows["b"], rows["c"], rows["cat"]], CHAIN)
    # link 1: 2 x 28 (b + a) + 2 x 24 (cat, on its way back); link 2: 2 x 24 (c + a) + 2 x 24 (cat).
    # Without the skip they would be 2 x 12 + 48 = 72 and 2 x 8 + 48 = 64: a's 2 x 16 on each.
    assert plan.link_wire_bytes_per_sample == (104, 96)


def test_chain_search_is_exact_against_brute_force() -> None:
    import itertools
    import random

    rng = random.Random(3)
    flops, params = sorted(rng.sample(range(1, 1000), 9)), sorted(rng.sample(range(1, 500), 9))
    candidates = [CutCandidate(f"l{i}", "Dense", [], [], rng.randint(1, 400), params[i], 500 - params[i],
                               flops[i], 1000 - flops[i]) for i in range(9)]
    for chain in [ChainConditions(("device", "edge", "cloud", "device"), [(1e4, 0.01), (1e3, 0.001)],
                                  [1e3, 1e4, None], batch_size=4),
                  ChainConditions(("device", "server", "device", "server", "device"), [(3e3, 0.02)],
                                  [2e3, 1e5], batch_size=4)]:
        count = len(chain.placement) - 1
        brute = sorted((plan_chain([candidates[i] for i in path], chain)
                        for path in itertools.combinations(range(9), count)),
                       key=lambda p: (p.total_seconds, p.cuts))
        assert [p.cuts for p in rank_chain(candidates, chain, top=7)] == [p.cuts for p in brute[:7]]
        assert len(rank_chain(candidates, chain)) == len(brute)


CHAIN_ARGV = ["--chain", "device,server,server,device", "--link", "0.008,100", "--link", "0.08,10",
              "--host-flops", "1e-7", "--host-flops", "1e-6", "--host-flops", "1e-5", "--batch-size", "10"]


def test_plan_command_chain_json_and_table(chain_model_path: str, capsys) -> None:
    assert main(["plan", chain_model_path, *CHAIN_ARGV, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["cuts"] for p in data["plans"]] == [["d1", "d2", "d4"], ["d1", "d3", "d4"],
                                                  ["d1", "d2", "d3"], ["d2", "d3", "d4"]]
    third = data["plans"][2]
    assert third["total_seconds"] == pytest.approx(1.4916)
    assert third["placement"] == ["device", "server1", "server2", "device"]
    assert third["link_wire_bytes_per_sample"] == [48, 40]
    assert data["device_only"]["total_seconds"] == pytest.approx(2.4)
    assert data["assumptions"]["hosts"] == ["device", "server1", "server2"]
    assert [link["link"] for link in data["assumptions"]["links"]] == ["device<->server1",
                                                                      "server1<->server2"]
    assert main(["plan", chain_model_path, *CHAIN_ARGV, "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "d1, d2, d4" in out and "d2, d3, d4" not in out and "whole model on the device" in out


@pytest.mark.parametrize("argv, message", [
    (CHAIN_ARGV[:4] + CHAIN_ARGV[6:], "has 3 hosts and 2 link(s) (device<->server1, server1<->server2); "
                                      "1 link(s) given"),
    (CHAIN_ARGV[:10] + CHAIN_ARGV[12:], "has 3 hosts (device, server1, server2); 2 FLOP/s given"),
    ([*CHAIN_ARGV, "--bandwidth", "1"], "--chain takes --link and --host-flops, not --bandwidth"),
    (CHAIN_ARGV[2:], "--link and --host-flops describe a chain: give --chain HOSTS too"),
    (["--chain", "device,server", "--link", "5", "--host-flops", "1", "--host-flops", "2"],
     "--link takes MBIT,MS"),
    (["--chain", "device,server", "--link", "5,-1", "--host-flops", "1", "--host-flops", "2"],
     "--link latency must be >= 0"),
    (["--latency", "1", "--device-flops", "1"], "the following arguments are required: --bandwidth"),
])
def test_plan_command_chain_mistakes_are_one_line(chain_model_path: str, capsys, argv: list,
                                                  message: str) -> None:
    assert main(["plan", chain_model_path, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""
