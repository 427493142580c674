"""The codec registry (`splitkeras.codecs`, `splitkeras.codec_bodies`) through `splitkeras.wire`:
the SPEC grammar, each codec's rounding bound, top-k error feedback, the decoder's checks
(one malformed body per defect, shared with wire.js), and byte-identical bodies from
wire.js (`mobile_export/test/encode_codecs.mjs`)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from splitkeras.codec_bodies import bfloat16_bits, bfloat16_values, topk_indices
from splitkeras.codecs import format_compress, parse_accepted, parse_codec, parse_compress
from splitkeras.errors import WireFormatError
from splitkeras.tensor_spec import TensorSpec
from splitkeras.wire import decode, encode, max_body_bytes

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "mobile_export" / "test" / "fixtures"
CODECS = ["float32", "float16", "bfloat16", "int8", "topk:0.1", "topk:0.1+int8", "topk:1"]  # as encode_codecs.mjs
ACT = TensorSpec("act", (None, 4), "float32")


def _fixture_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_codec_fixtures", FIXTURES / "make_codec_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixtures = _fixture_script()
MALFORMED = json.loads((FIXTURES / "codec_malformed.json").read_text(encoding="utf-8"))


def hashed(count: int, seed: int, scale: float) -> np.ndarray:
    """As encode_codecs.mjs: float32(((i + seed) * 2654435761 mod 2**32) / 2**32 - 0.5) * scale)."""
    index = (np.arange(count, dtype=np.uint64) + seed) * np.uint64(2654435761) % np.uint64(2**32)
    return ((index.astype(np.float64) / 2**32 - 0.5) * scale).astype(np.float32)


def ties_tensor() -> np.ndarray:
    data = (np.arange(20) % 3 - 1).astype(np.float32)
    data[4] = -0.0
    data.reshape(4, 5)[:, 2] = 0.75
    return data.reshape(4, 5)


def step_tensors(seed: int) -> dict[str, np.ndarray]:
    return {"act": hashed(60, seed, 8).reshape(6, 10), "labels": np.arange(6, dtype=np.int32)}


# ---------------------------------------------------------------- the SPEC grammar


def test_compress_specs_parse_and_print_back() -> None:
    both = parse_compress("forward=int8,backward=topk:0.05+int8")
    assert (both["forward"].spec, both["backward"].family, both["backward"].fraction) == ("int8", "topk", 0.05)
    assert format_compress(both) == "forward=int8,backward=topk:0.05+int8"
    assert format_compress(parse_compress("int8")) == "int8"
    assert parse_compress("backward=int8")["forward"].spec == "float32"
    assert parse_compress({"forward": "bfloat16"})["backward"].spec == "float32"
    assert parse_codec("topk:1").kept(7) == 7 and parse_codec("topk:0.05").kept(7) == 1
    assert parse_codec("topk:0.05").kept(100) == 5 and parse_codec("topk:0.3").kept(10) == 3


@pytest.mark.parametrize(("text", "message"), [
    ("float8", "Unknown codec 'float8'; use float32, float16, bfloat16, int8, topk:F"),
    ("topk:0.050", "the top-k fraction '0.050' is not a decimal in (0, 1] without trailing zeros"),
    ("topk:1.5", "the top-k fraction '1.5' is not a decimal"),
    ("topk:0", "the top-k fraction '0' is not a decimal"),
    ("topk:0.1+float16", "top-k values travel as float32 (topk:F) or int8 (topk:F+int8), not 'float16'"),
    ("sideways=int8", "'sideways=int8' is not forward=CODEC or backward=CODEC"),
    ("forward=int8,forward=int8", "names forward twice"),
    ("", "compress must be a codec or 'forward=CODEC,backward=CODEC'"),
])
def test_bad_specs_say_the_syntax(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        parse_compress(text)


def test_accepted_families() -> None:
    assert parse_accepted("float32, int8,topk") == ("float32", "int8", "topk")
    with pytest.raises(ValueError, match=r"Unknown codec families \['zip'\]"):
        parse_accepted("float32,zip")


# ---------------------------------------------------------------- what each codec keeps


def test_int8_is_within_half_a_step_per_channel() -> None:
    values = hashed(64 * 10, 9, 8).reshape(64, 10) * np.linspace(0.01, 100, 10, dtype=np.float32)
    tensors, _ = decode(encode({"act": values}, codec="int8"), codec="int8")
    step = (values.max(axis=0) - values.min(axis=0)) / 255
    error = np.abs(tensors["act"] - values)
    # the bound: half a step, plus the float32 roundings of the affine map (a few ulps of |x|)
    assert (error <= step / 2 + 4 * np.spacing(np.abs(values))).all()
    assert (error > step / 4).any()  # the bound is tight: the codec does round


def test_int8_keeps_constant_channels_and_zeros_exactly() -> None:
    values = np.array([[0.75, 0.0, -2.0], [0.75, -0.0, 2.0]], np.float32)
    tensors, _ = decode(encode({"act": values}, codec="int8"), codec="int8")
    np.testing.assert_array_equal(tensors["act"][:, :2], values[:, :2])


def test_bfloat16_rounds_to_nearest_even_like_ml_dtypes() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = (np.arange(2**20, dtype=np.uint64) * 4099).astype(np.uint32)
    floats = bits.view(np.float32)
    finite = np.isfinite(floats)
    with np.errstate(over="ignore"):
        expected = floats[finite].astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits(floats[finite]), expected)
    assert np.isnan(bfloat16_values(bfloat16_bits(np.array([np.nan], np.float32)))).all()
    with pytest.raises(WireFormatError, match="beyond the bfloat16 range"):
        encode({"a": np.array([3.4e38], np.float32)}, codec="bfloat16")


def test_topk_keeps_the_largest_magnitudes_ties_to_the_lower_index() -> None:
    data = np.array([1, -3, 3, 0, -3, 2], np.float32)
    assert topk_indices(data, 2).tolist() == [1, 2]
    assert topk_indices(data, 3).tolist() == [1, 2, 4]
    assert topk_indices(data, 6).tolist() == list(range(6))


def test_topk_error_feedback_loses_nothing_over_time() -> None:
    values = hashed(60, 5, 8).reshape(6, 10)
    residuals: dict[str, np.ndarray] = {}
    total = np.zeros_like(values)
    for _ in range(10):
        tensors, _ = decode(encode({"act": values}, codec="topk:0.1+int8", residuals=residuals),
                            codec="topk:0.1+int8")
        assert np.count_nonzero(tensors["act"]) == 6
        total += tensors["act"]
    np.testing.assert_allclose(total + residuals["act"], 10 * values, atol=1e-4)
    without = decode(encode({"act": values}, codec="topk:0.1+int8"), codec="topk:0.1+int8")[0]["act"]
    assert np.abs(10 * without - 10 * values).sum() > 10 * np.abs(total - 10 * values).sum() / 10


def test_topk_residual_restarts_when_the_shape_changes() -> None:
    residuals: dict[str, np.ndarray] = {}
    encode({"act": hashed(60, 1, 8).reshape(6, 10)}, codec="topk:0.1", residuals=residuals)
    small = hashed(30, 2, 8).reshape(3, 10)
    body = encode({"act": small}, codec="topk:0.1", residuals=residuals)
    assert body == encode({"act": small}, codec="topk:0.1")
    assert residuals["act"].shape == (3, 10)


def test_labels_and_integers_are_never_compressed() -> None:
    y = np.eye(3, dtype=np.float32)[[0, 2]]
    body = encode({"act": np.ones((2, 4), np.float32), "label:out": y, "ids": np.array([1, 2], np.int32)},
                  codec="int8", uncompressed={"label:out"})
    tensors, _ = decode(body, codec="int8")
    np.testing.assert_array_equal(tensors["label:out"], y)
    assert tensors["ids"].dtype == np.int32


@pytest.mark.parametrize("codec", ["float16", "bfloat16", "int8", "topk:0.05", "topk:0.05+int8", "topk:1"])
def test_max_body_bytes_bounds_every_codec(codec: str) -> None:
    specs = [TensorSpec("act", (None, 7, 64), "float32"), TensorSpec("ids", (None,), "int32")]
    limit = max_body_bytes(specs, 32, codec)
    body = encode({"act": hashed(32 * 7 * 64, 1, 5).reshape(32, 7, 64), "ids": np.zeros(32, np.int32)},
                  codec=codec, metadata={"step": "1"})
    assert len(body) <= limit
    assert max_body_bytes(specs, 32, ["float32", codec]) >= limit


def test_bytes_per_value() -> None:
    values = hashed(256 * 64, 3, 4).reshape(256, 64)
    plain = len(encode({"act": values}))
    ratios = {c: len(encode({"act": values}, codec=c)) / plain for c in ("int8", "topk:0.05+int8", "topk:0.05")}
    assert ratios["int8"] < 0.27 and ratios["topk:0.05+int8"] < 0.07 and ratios["topk:0.05"] < 0.11


# ---------------------------------------------------------------- the decoder's checks


def test_committed_malformed_fixtures_are_what_the_script_writes(tmp_path: Path) -> None:
    written = fixtures.write(tmp_path)
    for path in written:
        assert (FIXTURES / path.name).read_bytes() == path.read_bytes(), (
            f"{path.name} is stale: run mobile_export/test/fixtures/make_codec_fixtures.py")


@pytest.mark.parametrize("case", MALFORMED, ids=[case["name"] for case in MALFORMED])
def test_each_malformed_compressed_body_is_refused(case: dict) -> None:
    import base64

    with pytest.raises(WireFormatError) as caught:
        decode(base64.b64decode(case["body"]), [ACT], max_batch=8, codec=case["codec"])
    assert str(caught.value).startswith(case["message"]) and (not case["exact"] or str(caught.value) == case["message"])


def test_a_valid_body_of_each_codec_decodes() -> None:
    for codec in ("int8", "topk:0.5", "topk:0.5+int8"):
        body = fixtures.body_of(fixtures.parts_of(codec), codec)
        tensors, _ = decode(body, [ACT], max_batch=8, codec=codec)
        assert tensors["act"].shape == (2, 4)


# ---------------------------------------------------------------- wire.js writes the same bytes

NODE = shutil.which("node")


def test_wire_js_encodes_every_codec_byte_for_byte(tmp_path: Path) -> None:
    assert NODE, "node (>= 20) is required for the codecs.js interop tests; install Node.js"
    result = subprocess.run([NODE, "mobile_export/test/encode_codecs.mjs", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    for codec in CODECS:
        residuals: dict[str, np.ndarray] = {}
        for step in (1, 2):
            body = encode(step_tensors(step), codec=codec, residuals=residuals, metadata={"step": str(step)})
            assert (tmp_path / f"{codec}.{step}.safetensors").read_bytes() == body, f"{codec} step {step}"
            decoded = decode(body, codec=codec)[0]["act"]
            js_decoded = np.fromfile(tmp_path / f"{codec}.{step}.decoded.bin", "<f4").reshape(6, 10)
            np.testing.assert_array_equal(js_decoded.view(np.uint32), decoded.view(np.uint32))
        if codec.startswith("topk"):
            js_residual = np.fromfile(tmp_path / f"{codec}.residual.bin", "<f4").reshape(6, 10)
            np.testing.assert_array_equal(js_residual.view(np.uint32), residuals["act"].view(np.uint32))
        ties = encode({"tie": ties_tensor()}, codec=codec)
        assert (tmp_path / f"{codec}.ties.safetensors").read_bytes() == ties, f"{codec} ties"


def test_codecs_js_node_tests_pass() -> None:
    assert NODE
    result = subprocess.run([NODE, "--test", "test/codecs.test.js"], cwd=ROOT / "mobile_export",
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_int8_refuses_nan_and_inf_at_the_sender(bad: float) -> None:
    with pytest.raises(WireFormatError, match="tensor 'a': non-finite values, or a channel spanning beyond float32"):
        encode({"a": np.array([[1, bad], [2, 3]], np.float32)}, codec="int8")
