"""`splitkeras.protocol`: the step header's parsing, and the JavaScript twin
(`mobile_export/src/protocol.js`, the fake server of the Hermes and browser tests) agreeing
with it, word for word."""

from __future__ import annotations

import json
import subprocess

import pytest
from js_support import MOBILE, require_node

from splitkeras import protocol
from splitkeras.errors import REFUSAL_CODES, RequestRefused

BAD = [None, "", " ", "abc", "-1", "1.5", "+1", "1_0", "0x10", "1e3", "٣", str(2**53 + 1), "9" * 17,
       "9" * 40, "0, 0"]
GOOD = {"0": 0, "7": 7, " 12 ": 12, "007": 7, str(2**53): 2**53}


@pytest.mark.parametrize("value", BAD)
def test_a_bad_step_header_is_a_bad_request_that_says_how_to_fix_it(value: str | None) -> None:
    with pytest.raises(RequestRefused) as info:
        protocol.parse_step(value)
    assert info.value.code == "bad_request"
    assert "`Splitkeras-Step: <k>` (a whole number in 0..2**53)" in info.value.message


@pytest.mark.parametrize("value,step", sorted(GOOD.items()))
def test_a_step_header_is_a_whole_number_up_to_2_53(value: str, step: int) -> None:
    assert protocol.parse_step(value) == step
    assert protocol.parse_step([value]) == step


def test_a_repeated_step_header_is_refused() -> None:
    with pytest.raises(RequestRefused, match=r"came 2 times \('1', '2'\); send it once"):
        protocol.parse_step(["1", "2"])
    with pytest.raises(RequestRefused, match="missing"):
        protocol.parse_step([])


def test_the_codes_the_client_recovers_from_are_the_servers() -> None:
    assert {protocol.UNKNOWN_SESSION, protocol.STEP_OUT_OF_ORDER} | protocol.LOST_FORWARD_CODES <= set(REFUSAL_CODES)
    with pytest.raises(KeyError, match="not in splitkeras.errors.REFUSAL_CODES"):
        protocol._code("no_such_code")
    assert protocol.step_path("s1", "backward") == "/v1/sessions/s1/backward"
    with pytest.raises(ValueError, match="route must be one of"):
        protocol.step_path("s1", "steps/0/forward")


SCRIPT = """
import * as p from './src/protocol.js';
import { stepOf } from './test/hermes/fake_server.js';
const values = JSON.parse(process.argv[1]);
const answers = [];
for (const value of values) {
  const { step, refused } = stepOf(value === null ? {} : { 'splitkeras-step': value });
  if (refused) {
    const bytes = new Uint8Array(await refused.arrayBuffer());
    answers.push({ status: refused.status, error: JSON.parse(new TextDecoder().decode(bytes)).error });
  } else answers.push({ step });
}
console.log(JSON.stringify({ constants: { STEP_HEADER: p.STEP_HEADER, MAX_STEP: p.MAX_STEP,
  STEP_ROUTES: p.STEP_ROUTES, TENSOR_ROUTES: p.TENSOR_ROUTES, UNKNOWN_SESSION: p.UNKNOWN_SESSION,
  STEP_OUT_OF_ORDER: p.STEP_OUT_OF_ORDER, PIPELINE_FULL: p.PIPELINE_FULL,
  LOST_FORWARD_CODES: p.LOST_FORWARD_CODES },
  path: p.stepPath('s1', 'forward'), answers }));
"""


def test_the_javascript_twin_and_the_fake_server_agree_with_the_server() -> None:
    node = require_node()
    values = [v for v in BAD if v is None or "," not in v] + list(GOOD)  # Node joins repeats with ", "
    completed = subprocess.run([node, "--input-type=module", "-e", SCRIPT, json.dumps(values)], cwd=MOBILE,
                               capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(completed.stdout)
    assert result["constants"] == {
        "STEP_HEADER": protocol.STEP_HEADER, "MAX_STEP": protocol.MAX_STEP,
        "STEP_ROUTES": list(protocol.STEP_ROUTES), "TENSOR_ROUTES": list(protocol.TENSOR_ROUTES),
        "UNKNOWN_SESSION": protocol.UNKNOWN_SESSION, "STEP_OUT_OF_ORDER": protocol.STEP_OUT_OF_ORDER,
        "PIPELINE_FULL": protocol.PIPELINE_FULL, "LOST_FORWARD_CODES": sorted(protocol.LOST_FORWARD_CODES)}
    assert result["path"] == protocol.step_path("s1", "forward")
    for value, answer in zip(values, result["answers"], strict=True):
        try:
            expected: dict[str, object] = {"step": protocol.parse_step(value)}
        except RequestRefused as refusal:
            expected = {"status": 400, "error": {"code": refusal.code, "message": refusal.message}}
        assert answer == expected, value
