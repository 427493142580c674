"""Helpers for the tests that run the JavaScript device runtime under Node: tensors to and
from the driver's JSON, running `mobile_export/tools/device_e2e.mjs`, comparing weights."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from converters.tfjs_config import tfjs_named_weights

__all__ = ["MOBILE", "DRIVER", "require_node", "tensor", "array", "run_driver", "max_weight_diff"]

REPO = Path(__file__).resolve().parents[1]
MOBILE = REPO / "mobile_export"
DRIVER = MOBILE / "tools" / "device_e2e.mjs"


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js (>= 20) is not on PATH; install it to test the JavaScript runtime.")
    if not (MOBILE / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        pytest.fail("mobile_export/node_modules is missing: run `npm ci --prefix mobile_export`.")
    return node


def tensor(array: np.ndarray) -> dict[str, Any]:
    dtype = "int32" if array.dtype.kind in "iu" else "float32"
    data = np.ascontiguousarray(array.astype("<i4" if dtype == "int32" else "<f4"))
    return {"shape": list(array.shape), "dtype": dtype, "data": base64.b64encode(data.tobytes()).decode()}


def array(tensor: dict[str, Any]) -> np.ndarray:
    dtype = "<i4" if tensor["dtype"] == "int32" else "<f4"
    return np.frombuffer(base64.b64decode(tensor["data"]), dtype).reshape(tensor["shape"])



def run_driver(node: str, job: dict[str, Any], folder: Path, driver: Path = DRIVER) -> dict[str, Any]:
    job_path, out_path = folder / "job.json", folder / "result.json"
    job_path.write_text(json.dumps(job))
    completed = subprocess.run([node, str(driver), str(job_path), str(out_path)], cwd=MOBILE,
                               capture_output=True, text=True, timeout=240)
    if not out_path.exists():
        pytest.fail(f"{driver.name} wrote no result (exit {completed.returncode}):\n"
                    f"{completed.stderr[-3000:]}")
    result = json.loads(out_path.read_text())
    assert "error" not in result, f"{result['error']}\n{result.get('stack', '')}"
    return result


def max_weight_diff(split: Any, js_weights: dict[str, Any]) -> tuple[float, int]:
    worst, count = 0.0, 0
    for segment in split.segments:
        if segment.placement != "device":
            continue
        for name, variable in tfjs_named_weights(segment.model):
            expected = keras.ops.convert_to_numpy(variable)
            actual = array(js_weights[name])
            assert actual.shape == expected.shape, name
            worst = max(worst, float(np.max(np.abs(actual - expected))))
            count += 1
    return worst, count
