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
"""

from __future__ import annotations

import json

import keras
import pytest

from splitkeras.cli import main
from splitkeras.planning import Conditions, device_only, plan_pair, plan_single, rank_cuts
from splitkeras.profile import cut_candidates


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
    ({"device_flops": 0}, "device FLOP/s"), ({"wire_dtype": "int8"}, "wire dtype"),
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
