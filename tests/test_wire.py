"""Tests of `splitkeras.wire`, the safetensors tensor wire format.

Round trips, interop with the `safetensors` package both ways, every refusal
with its message pinned, a fuzz test (only `WireFormatError` may escape), the
size overhead, and interop with the JavaScript twin `mobile_export/src/wire.js`
(its bodies decoded here; its own node tests run too).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitkeras.errors import SplitKerasError, WireFormatError
from splitkeras.tensor_spec import TensorSpec
from splitkeras.wire import (
    ACCEPTED_MEDIA_TYPES,
    MEDIA_TYPE,
    WIRE_DTYPES,
    decode,
    encode,
    is_wire_media_type,
    max_body_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "mobile_export" / "test" / "fixtures"
NODE = shutil.which("node")
ACT = TensorSpec("act", (None, 4), "float32")
LABELS = TensorSpec("labels", (None,), "int32")


def _load_fixture_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "make_wire_fixtures", FIXTURES / "make_wire_fixtures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixtures = _load_fixture_script()


def header_of(body: bytes) -> dict:
    length = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + length])


def act_and_labels(batch: int = 2) -> dict[str, np.ndarray]:
    return {
        "act": np.arange(batch * 4, dtype=np.float32).reshape(batch, 4) / 3,
        "labels": np.arange(batch, dtype=np.int32),
    }


def run_node(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert NODE, "node (>= 20) is required for the wire.js interop tests; install Node.js"
    return subprocess.run(
        [NODE, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# ---------------------------------------------------------------- round trips


def test_constants() -> None:
    assert MEDIA_TYPE == "application/vnd.splitkeras.safetensors"
    assert ACCEPTED_MEDIA_TYPES == (MEDIA_TYPE, "application/octet-stream")
    assert WIRE_DTYPES == ("float32", "float16")
    assert is_wire_media_type("application/vnd.splitkeras.safetensors; charset=binary")
    assert is_wire_media_type("Application/Octet-Stream")
    assert not is_wire_media_type("application/json")
    assert not is_wire_media_type(None)
    assert issubclass(WireFormatError, SplitKerasError)


@pytest.mark.parametrize("shape", [(2, 3, 4), (1,), (), (3, 0)])
def test_float32_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    special = np.array([0.0, -0.0, 1e-45, 1.17e-38, 3.4e38, -3.4e38, 0.1, -7.5], np.float32)
    array = np.resize(special, shape).astype(np.float32)
    tensors, metadata = decode(encode({"x": array}))
    assert metadata == {}
    assert tensors["x"].dtype == np.float32 and tensors["x"].shape == shape
    np.testing.assert_array_equal(tensors["x"].view(np.uint32), array.view(np.uint32))


def test_strided_and_big_endian_arrays_encode_like_plain_ones() -> None:
    plain = np.arange(24, dtype=np.float32).reshape(4, 6)
    for variant in (plain.T.copy().T, plain.astype(">f4"), np.asfortranarray(plain)):
        assert encode({"x": variant}) == encode({"x": plain})
    strided = np.arange(48, dtype=np.int32)[::2].reshape(4, 6)
    assert encode({"x": strided}) == encode({"x": strided.copy()})
    assert encode({"x": np.arange(3, dtype=">i8")}) == encode({"x": np.arange(3, dtype="<i8")})


def test_decode_is_zero_copy_and_read_only_for_float32() -> None:
    body = encode({"x": np.ones((4, 8), np.float32)})
    tensors, _ = decode(body)
    assert not tensors["x"].flags.owndata
    assert not tensors["x"].flags.writeable
    assert np.shares_memory(tensors["x"], np.frombuffer(body, np.uint8))


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
@pytest.mark.parametrize(
    "dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]
)
def test_integer_and_bool_tensors_keep_their_dtype(dtype: str, wire_dtype: str) -> None:
    info = np.iinfo(dtype) if dtype != "bool" else None
    values = [0, 1] if info is None else [info.min, info.max, 0, 1]
    array = np.array(values * 3, dtype=dtype).reshape(3, -1)
    body = encode({"ids": array}, wire_dtype=wire_dtype)
    tensors, _ = decode(body)
    assert tensors["ids"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(tensors["ids"], array)


def test_float16_on_the_wire_rounds_like_numpy_and_halves_the_bytes() -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((16, 64)) * np.logspace(-9, 4, 64)).astype(np.float32)
    body16 = encode({"act": array}, wire_dtype="float16")
    body32 = encode({"act": array})
    assert len(body16) - 2 * array.size < 200 and len(body32) - 4 * array.size < 200
    assert header_of(body16)["act"]["dtype"] == "F16"
    tensors, _ = decode(body16, [TensorSpec("act", (None, 64), "float32")])
    assert tensors["act"].dtype == np.float32
    np.testing.assert_array_equal(tensors["act"], array.astype(np.float16).astype(np.float32))


def test_float64_and_tf_tensors_are_cast_to_the_wire_dtype() -> None:
    import tensorflow as tf

    array = np.linspace(-2, 2, 12).reshape(3, 4)
    for value in (array, tf.constant(array), tf.constant(array, tf.float32)):
        body = encode({"act": value})
        assert body == encode({"act": array.astype(np.float32)})
    tensors, _ = decode(encode({"act": tf.constant(array)}, wire_dtype="float16"), [ACT])
    np.testing.assert_array_equal(tensors["act"], array.astype(np.float16).astype(np.float32))


def test_header_is_padded_to_8_bytes_and_tensors_keep_the_given_order() -> None:
    names = ["zeta", "alpha", "mid", "b"]
    arrays = {name: np.ones((2, i + 1), np.float32) for i, name in enumerate(names)}
    for metadata in [None, *({"k": "v" * i} for i in range(9))]:
        body = encode(arrays, metadata=metadata)
        length = int.from_bytes(body[:8], "little")
        assert length % 8 == 0
        text = body[8 : 8 + length]
        assert text.rstrip(b" ").endswith(b"}") and len(text) - len(text.rstrip(b" ")) < 8
        header = header_of(body)
        assert [key for key in header if key != "__metadata__"] == names
        offsets = [header[name]["data_offsets"] for name in names]
        assert offsets == sorted(offsets) and offsets[0][0] == 0


def test_decode_returns_the_specs_order_and_dtypes() -> None:
    arrays = {**act_and_labels(3), "extra16": np.ones((3, 2), np.float32)}
    body = encode(arrays, wire_dtype="float16")
    specs = [
        LABELS,
        TensorSpec("extra16", (None, 2), "float16"),
        TensorSpec("act", (None, 4), "float64"),
    ]
    tensors, _ = decode(body, specs, max_batch=3)
    assert list(tensors) == ["labels", "extra16", "act"]
    assert [t.dtype for t in tensors.values()] == [np.int32, np.float16, np.float64]


def test_several_tensors_share_one_batch_size() -> None:
    specs = [
        ACT,
        LABELS,
        TensorSpec("mask", (None, 2, 2), "bool"),
        TensorSpec("table", (3, 2), "float32"),  # no batch dimension: not part of the check
    ]
    body = encode(
        {
            **act_and_labels(5),
            "mask": np.ones((5, 2, 2), bool),
            "table": np.zeros((3, 2), np.float32),
        },
        metadata={"step": "4"},
    )
    tensors, metadata = decode(body, specs, max_batch=5)
    assert {name: t.shape for name, t in tensors.items()} == {
        "act": (5, 4),
        "labels": (5,),
        "mask": (5, 2, 2),
        "table": (3, 2),
    }
    assert metadata == {"step": "4"}


def test_a_float16_spec_refuses_float32_values_it_cannot_hold() -> None:
    body = encode({"act": np.full((1, 4), 70000.0, np.float32)})
    with pytest.raises(WireFormatError, match="tensor 'act': contains 4 non-finite values"):
        decode(body, [TensorSpec("act", (None, 4), "float16")])


def test_bytearray_and_memoryview_bodies_are_accepted() -> None:
    body = encode(act_and_labels())
    for view in (bytearray(body), memoryview(body), memoryview(b"xx" + body)[2:]):
        tensors, _ = decode(view, [ACT, LABELS])
        np.testing.assert_array_equal(tensors["act"], act_and_labels()["act"])


def test_non_finite_values_pass_only_when_allowed() -> None:
    arrays = act_and_labels()
    arrays["act"][0, 1], arrays["act"][1, 3] = np.nan, -np.inf
    body = encode(arrays)
    with pytest.raises(WireFormatError, match=re.escape("tensor 'act': contains 2 non-finite")):
        decode(body, [ACT, LABELS])
    with pytest.raises(WireFormatError, match="allow_nonfinite=True"):
        decode(body)
    tensors, _ = decode(body, [ACT, LABELS], allow_nonfinite=True)
    assert np.isnan(tensors["act"][0, 1]) and tensors["act"][1, 3] == -np.inf


# ---------------------------------------------------------------- interop


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
def test_the_safetensors_package_reads_our_bodies(wire_dtype: str, tmp_path: Path) -> None:
    arrays = {**act_and_labels(3), "big": np.arange(70, dtype=np.int64)}
    body = encode(arrays, wire_dtype=wire_dtype, metadata={"step": "9", "note": "\u00e9"})
    loaded = safetensors.numpy.load(body)
    assert loaded["act"].dtype == np.dtype(wire_dtype)
    np.testing.assert_array_equal(loaded["act"], arrays["act"].astype(wire_dtype))
    np.testing.assert_array_equal(loaded["labels"], arrays["labels"])
    np.testing.assert_array_equal(loaded["big"], arrays["big"])
    (tmp_path / "body.safetensors").write_bytes(body)
    with safetensors.safe_open(tmp_path / "body.safetensors", framework="np") as opened:
        assert opened.metadata() == {"step": "9", "note": "\u00e9"}


def test_we_read_the_safetensors_package_bodies() -> None:
    arrays = {
        "f32": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
        "f16": np.linspace(-1, 1, 5).astype(np.float16),
        "f64": np.linspace(0, 1, 3),
        "i64": np.array([-(2**62), 2**62]),
        "u8": np.arange(7, dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float32),
    }
    body = safetensors.numpy.save(arrays, metadata={"format": "np", "step": "2"})
    tensors, metadata = decode(body)
    assert metadata == {"format": "np", "step": "2"}
    assert set(tensors) == set(arrays)
    for name, array in arrays.items():
        expected = array.astype(np.float32) if array.dtype == np.float16 else array
        assert tensors[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(tensors[name], expected)
    specs = [TensorSpec("f32", (None, 3, 4), "float32"), TensorSpec("f16", (None,), "float32")]
    body = safetensors.numpy.save({"f32": arrays["f32"][:1], "f16": arrays["f16"][:1]})
    tensors, _ = decode(body, specs, max_batch=1)
    assert tensors["f16"].dtype == np.float32


# ---------------------------------------------------------------- size


def test_a_float32_body_is_at_most_1_kib_over_the_raw_bytes() -> None:
    array = np.zeros((32, 56, 56, 64), np.float32)
    body = encode({"conv2d_3": array}, metadata={"session": "s" * 36, "step": "123456"})
    assert len(body) <= array.nbytes + 1024
    body16 = encode({"conv2d_3": array}, wire_dtype="float16")
    assert len(body16) <= array.nbytes // 2 + 1024


def test_max_body_bytes_bounds_every_valid_body() -> None:
    specs = [TensorSpec("act", (None, 56, 56, 64), "float32"), LABELS]
    limit = max_body_bytes(specs, 32)
    assert limit == 8 + 64 * 1024 + 32 * 56 * 56 * 64 * 4 + 32 * 4
    assert max_body_bytes(specs, 32, "float16") == 8 + 64 * 1024 + 32 * 56 * 56 * 64 * 2 + 32 * 4
    assert max_body_bytes(specs, 32, max_header_bytes=100) == limit - 64 * 1024 + 100
    body = encode(
        {"act": np.zeros((32, 56, 56, 64), np.float32), "labels": np.zeros(32, np.int32)},
        metadata={"session": "x" * 200},
    )
    assert len(body) <= limit
    decode(body, specs, max_batch=32)
    with pytest.raises(WireFormatError, match=re.escape("tensor 'seq': shape [None, None, 8]")):
        max_body_bytes([TensorSpec("seq", (None, None, 8), "float32")], 4)
    with pytest.raises(WireFormatError, match="Unknown codec 'float8'"):
        max_body_bytes(specs, 4, "float8")


# ---------------------------------------------------------------- refusals

# Every body make_wire_fixtures.malformed_cases() builds, with the message decode
# must give; wire.test.js checks wire.js gives the same (see wire_malformed.json).
MALFORMED_MESSAGES = {
    "body_too_short": (
        "body is 3 bytes; a safetensors body starts with an 8-byte little-endian header length"
    ),
    "header_over_limit": "header length 1048576 is over the limit of 65536 bytes",
    "header_past_body": "header length 100 runs past the end of the 10-byte body (truncated body?)",
    "header_not_utf8": "header is not valid UTF-8: ",
    "header_not_json": "header is not valid JSON: ",
    "header_json_nan": "header is not valid JSON: NaN is not JSON",
    "header_not_object": "header must be a JSON object starting with '{'",
    "header_leading_space": "header must be a JSON object starting with '{'",
    "metadata_not_strings": "__metadata__ must map strings to strings",
    "entry_not_object": "tensor 'act': entry must be an object with dtype, shape and data_offsets",
    "entry_missing_offsets": (
        "tensor 'act': entry must be an object with dtype, shape and data_offsets"
    ),
    "dtype_unknown": (
        "tensor 'act': dtype \"F8_E4M3\" is not supported; supported: F64, F32, F16, BF16, I64, "
        "I32, I16, "
        "I8, U64, U32, U16, U8, BOOL"
    ),
    "shape_negative": "tensor 'act': shape must be a list of non-negative integers, got [-2,4]",
    "offsets_not_pair": "tensor 'act': data_offsets must be [begin, end] integers >= 0, got [0]",
    "offsets_past_end": "tensor 'act': data_offsets [0, 1000] out of range for 40 data bytes",
    "offsets_end_before_begin": (
        "tensor 'labels': data_offsets [40, 32] out of range for 40 data bytes"
    ),
    "offsets_size_mismatch": (
        "tensor 'act': data_offsets [0, 16] span 16 bytes but shape [2, 4] of F32 needs 32 "
        "bytes"
    ),
    "offsets_not_from_zero": (
        "tensor 'act': data_offsets start at 8; the first tensor must start at 0"
    ),
    "offsets_overlap": "tensor 'labels': data_offsets [24, 32] overlap tensor 'act' ending at 32",
    "offsets_gap": (
        "tensor 'labels': data_offsets [36, 44] leave a gap after tensor 'act' ending at 32"
    ),
    "trailing_bytes": (
        "4 trailing bytes after the last tensor (data buffer is 44 bytes, tensors end at 40)"
    ),
    "name_missing": (
        "tensor names do not match: expected ['act', 'labels'], received ['act'] (missing: "
        "['labels']; unexpected: [])"
    ),
    "name_extra": (
        "tensor names do not match: expected ['act', 'labels'], received ['act', 'labels', "
        "'mask'] (missing: []; unexpected: ['mask'])"
    ),
    "name_renamed": (
        "tensor names do not match: expected ['act', 'labels'], received ['activation', "
        "'labels'] (missing: ['act']; unexpected: ['activation'])"
    ),
    "float_dtype_f64": (
        "tensor 'act': dtype F64 is not allowed for spec dtype float32; expected F32 or F16"
    ),
    "int_dtype_mismatch": (
        "tensor 'labels': dtype I64 is not allowed for spec dtype int32; expected I32"
    ),
    "float_for_int_spec": (
        "tensor 'labels': dtype F32 is not allowed for spec dtype int32; expected I32"
    ),
    "rank_mismatch": (
        "tensor 'act': shape [2, 4, 1] has rank 3; expected rank 2 for shape [None, 4]"
    ),
    "dim_mismatch": (
        "tensor 'act': shape [2, 5] does not match expected [None, 4] (dimension 1 is 5, "
        "expected 4)"
    ),
    "batch_differs": "batch sizes differ between tensors: 'act' has 2, 'labels' has 3",
    "batch_zero": "tensor 'act': batch size is 0; send at least one sample",
    "batch_over_max": "tensor 'act': batch size 2 is over the limit of 1; send smaller batches",
    "batch_over_max_no_spec": (
        "tensor 'act': batch size 3 is over the limit of 2; send smaller batches"
    ),
    "nan": (
        "tensor 'act': contains 1 non-finite values (NaN or Inf); pass allow_nonfinite=True to "
        "accept them"
    ),
    "inf_in_float16": (
        "tensor 'act': contains 1 non-finite values (NaN or Inf); pass allow_nonfinite=True to "
        "accept them"
    ),
}
MALFORMED = list(fixtures.malformed_cases())


def test_every_malformed_case_has_a_pinned_message() -> None:
    assert [name for name, _, _ in MALFORMED] == list(MALFORMED_MESSAGES)


@pytest.mark.parametrize("name, body, options", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_body_is_refused_with_a_clear_message(
    name: str, body: bytes, options: dict
) -> None:
    with pytest.raises(WireFormatError, match="^" + re.escape(MALFORMED_MESSAGES[name])):
        decode(body, **options)


def test_duplicate_keys_are_refused() -> None:
    entry = '{"dtype":"I32","shape":[1],"data_offsets":[0,4]}'
    for header, message in [
        (f'{{"a":{entry},"a":{entry}}}', "header has the key 'a' twice"),
        (f'{{"a":{entry[:-1]},"dtype":"I32"}}}}', "header has the key 'dtype' twice"),
    ]:
        with pytest.raises(WireFormatError, match=re.escape(message)):
            decode(fixtures.raw_body(header.encode(), bytes(4)))


def test_bodies_that_are_not_bytes_are_refused() -> None:
    with pytest.raises(WireFormatError, match="body must be bytes, got str"):
        decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(WireFormatError, match="body must be bytes, got memoryview"):
        decode(memoryview(bytes(64))[::2])


def test_the_header_limit_can_be_lowered() -> None:
    body = encode(act_and_labels(), metadata={"k": "v" * 100})
    length = int.from_bytes(body[:8], "little")
    decode(body, max_header_bytes=length)
    with pytest.raises(WireFormatError, match=f"header length {length} is over the limit of 64 "):
        decode(body, max_header_bytes=64)


def test_encode_refuses_bad_input() -> None:
    ones = np.ones((2, 4), np.float32)
    with pytest.raises(WireFormatError, match=re.escape("Unknown codec 'float8'; use float32")):
        encode({"act": ones}, wire_dtype="float8")
    with pytest.raises(WireFormatError, match="metadata must map strings to strings"):
        encode({"act": ones}, metadata={"step": 3})  # type: ignore[dict-item]
    with pytest.raises(WireFormatError, match="tensor name '__metadata__' is not allowed"):
        encode({"__metadata__": ones})
    with pytest.raises(WireFormatError, match="tensor name 3 is not allowed"):
        encode({3: ones})  # type: ignore[dict-item]
    with pytest.raises(WireFormatError, match="tensor 'text' has dtype str96"):
        encode({"text": np.array(["abc"])})
    with pytest.raises(WireFormatError, match="tensor 'z' has dtype complex64"):
        encode({"z": np.ones(3, np.complex64)})
    with pytest.raises(
        WireFormatError, match="tensor 'act': finite values beyond the float16 range; send float32"
    ):
        encode({"act": ones * 65520}, wire_dtype="float16")
    encode({"act": np.full(3, np.inf, np.float32)}, wire_dtype="float16")  # already Inf: no error


# ---------------------------------------------------------------- fuzz

VALID_BODIES = [
    encode(act_and_labels(), metadata={"step": "1"}),
    encode(act_and_labels(3), wire_dtype="float16"),
    *fixtures.valid_bodies().values(),
]


def check_only_wire_format_errors(body: bytes) -> None:
    for options in ({}, {"expected": [ACT, LABELS], "max_batch": 4}):
        try:
            decode(body, **options)
        except WireFormatError:
            pass


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(body: bytes) -> None:
    check_only_wire_format_errors(body)
    check_only_wire_format_errors(len(body).to_bytes(8, "little") + body)


@FUZZ
@given(st.sampled_from(VALID_BODIES), st.data())
def test_fuzz_mutated_and_truncated_bodies(body: bytes, data: st.DataObject) -> None:
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if kind == "set" and mutated:
            printable = st.sampled_from(list(b'{}[]",:-0123456789eE. '))
            mutated[at] = data.draw(printable | st.integers(0, 255))
        elif kind == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del mutated[at : at + data.draw(st.integers(1, 8))]
        else:
            del mutated[at:]
    check_only_wire_format_errors(bytes(mutated))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
ENTRIES = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "I32", "I64", "BOOL", "BF16", "F8"]) | JSON_VALUES,
        "shape": st.lists(st.integers(-1, 5), max_size=4) | JSON_VALUES,
        "data_offsets": st.lists(st.integers(-1, 70), min_size=2, max_size=2) | JSON_VALUES,
    }
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["act", "labels", "other", "__metadata__"]),
        ENTRIES | JSON_VALUES | st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
        max_size=4,
    ),
    st.integers(0, 80),
)
def test_fuzz_structured_headers(header: dict, data_length: int) -> None:
    text = json.dumps(header, allow_nan=True).encode()
    check_only_wire_format_errors(fixtures.raw_body(text, bytes(range(data_length))))


# ---------------------------------------------------------------- fixtures and wire.js


def test_committed_fixtures_are_what_the_script_writes(tmp_path: Path) -> None:
    written = fixtures.write(tmp_path)
    for path in written:
        committed = FIXTURES / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run mobile_export/test/fixtures/make_wire_fixtures.py"
        )
    assert sum(path.stat().st_size for path in written) < 200_000


def test_python_decodes_what_wire_js_encodes(tmp_path: Path) -> None:
    result = run_node("mobile_export/test/encode_fixture.mjs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    # Same tensors and options as the Python fixtures: byte-identical bodies.
    for name in ("float32", "float16_multi"):
        js_body = (tmp_path / f"js_{name}.safetensors").read_bytes()
        assert js_body == (FIXTURES / f"py_{name}.safetensors").read_bytes()
    body = (tmp_path / "js_float32.safetensors").read_bytes()
    tensors, metadata = decode(body, [TensorSpec("x", (None, 3, 4), "float32")], max_batch=2)
    assert metadata == {"step": "7", "session": "abc-123"}
    np.testing.assert_array_equal(tensors["x"], fixtures.ramp(24, 0.37, -4.1).reshape(2, 3, 4))
    body = (tmp_path / "js_float16_multi.safetensors").read_bytes()
    tensors, metadata = decode(body, [TensorSpec("activation", (None, 5), "float32"), LABELS])
    assert metadata == {"step": "8", "note": "h\u00e9llo \u2713"}
    loaded = safetensors.numpy.load(body)
    assert loaded["activation"].dtype == np.float16
    np.testing.assert_array_equal(loaded["activation"].astype(np.float32), tensors["activation"])
    np.testing.assert_array_equal(tensors["labels"], [2, 0, 1])
    body = (tmp_path / "js_unaligned.safetensors").read_bytes()
    assert header_of(body)["ids"]["data_offsets"] == [6, 10]
    specs = [TensorSpec("act", (None, 3), "float32"), TensorSpec("ids", (None,), "int32")]
    tensors, _ = decode(body, specs)
    np.testing.assert_array_equal(tensors["act"], [[0.5, -1.25, 3.0]])
    np.testing.assert_array_equal(tensors["ids"], [-42])
    np.testing.assert_array_equal(safetensors.numpy.load(body)["ids"], [-42])


def test_wire_js_float16_conversion_matches_numpy_bit_for_bit(tmp_path: Path) -> None:
    result = run_node("mobile_export/test/encode_fixture.mjs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    halves = np.arange(65536, dtype=np.uint16)
    js_floats = np.fromfile(tmp_path / "js_f16_to_f32.bin", "<u4")
    expected_floats = halves.view(np.float16).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(js_floats, expected_floats)
    count = 2**32 // 4099 + 1  # SWEEP_STEP in encode_fixture.mjs
    floats = (np.arange(count, dtype=np.uint64) * 4099).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore"):
        expected = floats.astype(np.float16).view(np.uint16)
    js_halves = np.fromfile(tmp_path / "js_f32_to_f16.bin", "<u2")
    mismatches = np.flatnonzero(js_halves != expected)
    assert mismatches.size == 0, [hex(floats.view(np.uint32)[i]) for i in mismatches[:10]]


def test_wire_js_node_tests_pass() -> None:
    result = run_node("--test", "test/wire.test.js", cwd=ROOT / "mobile_export")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
