"""The codec section of `wire_formats.py`: encode + decode throughput of every codec on one
8 MiB float32 tensor ([32, 256, 256], ReLU activations), in Python (`splitkeras.wire`) and
in JavaScript (`codec_speed.mjs`, Node, `mobile_export/src/wire.js`), next to a full sort
of the tensor's magnitudes in each language (what top-k must not be slower than).

Floors: int8 >= 1 GB/s in Python and >= 200 MB/s in JavaScript; top-k encode + decode no
slower than a full sort, in each language.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, median, table, verdict

from splitkeras import wire
from splitkeras.tensor_spec import TensorSpec

SHAPE = (32, 256, 256)  # 8 MiB of float32
CODECS = ["float32", "float16", "bfloat16", "int8", "topk:0.05", "topk:0.05+int8"]
FLOOR_INT8_PYTHON, FLOOR_INT8_JS = 1e9, 200e6


def tensor() -> np.ndarray:
    """ReLU of a hashed uniform in [-0.5, 0.5) times 8 (codec_speed.mjs computes the same)."""
    index = np.arange(np.prod(SHAPE), dtype=np.uint64) * np.uint64(2654435761) % np.uint64(2**32)
    return np.maximum((index.astype(np.float64) / 2**32 - 0.5) * 8, 0).astype(np.float32).reshape(SHAPE)


def python_rows(rounds: int) -> dict[str, Any]:
    array = tensor()
    spec = [TensorSpec("act", (None, *SHAPE[1:]), "float32")]
    times: dict[str, list[tuple[float, float]]] = {codec: [] for codec in CODECS}
    sizes: dict[str, int] = {}
    sort_times = []
    for _ in range(rounds):  # interleaved rounds, medians
        for codec in CODECS:
            residuals: dict[str, np.ndarray] = {}
            started = time.perf_counter()
            body = wire.encode({"act": array}, codec=codec, residuals=residuals)
            middle = time.perf_counter()
            wire.decode(body, spec, max_batch=64, codec=codec)
            times[codec].append((middle - started, time.perf_counter() - middle))
            sizes[codec] = len(body)
        started = time.perf_counter()
        np.sort(np.abs(array).reshape(-1))
        sort_times.append(time.perf_counter() - started)
    rows = {}
    for codec in CODECS:
        encode_s, decode_s = median([t[0] for t in times[codec]]), median([t[1] for t in times[codec]])
        rows[codec] = {"encode_s": encode_s, "decode_s": decode_s, "body_bytes": sizes[codec],
                       "size_vs_float32": sizes[codec] / array.nbytes,
                       "throughput_bytes_per_s": array.nbytes / (encode_s + decode_s)}
    return {"codecs": rows, "full_sort_s": median(sort_times)}


def js_rows(rounds: int) -> dict[str, Any] | None:
    node = shutil.which("node")
    if node is None:
        return None
    script = Path(__file__).resolve().parent / "codec_speed.mjs"
    output = subprocess.run([node, str(script), str(rounds)], cwd=ROOT, check=True, capture_output=True,
                            text=True, timeout=1800).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


def section(rounds: int) -> tuple[dict[str, Any], str]:
    python, js = python_rows(rounds), js_rows(max(3, rounds // 3))
    floors = {"int8_python_bytes_per_s": python["codecs"]["int8"]["throughput_bytes_per_s"] >= FLOOR_INT8_PYTHON,
              "topk_python_vs_sort": all(python["codecs"][c]["encode_s"] + python["codecs"][c]["decode_s"]
                                         <= python["full_sort_s"] for c in CODECS if c.startswith("topk"))}
    if js is not None:
        floors["int8_js_bytes_per_s"] = js["codecs"]["int8"]["throughput_bytes_per_s"] >= FLOOR_INT8_JS
        floors["topk_js_vs_sort"] = all(js["codecs"][c]["encode_s"] + js["codecs"][c]["decode_s"]
                                        <= js["full_sort_s"] for c in CODECS if c.startswith("topk"))
    rows = []
    for codec in CODECS:
        p = python["codecs"][codec]
        j = js["codecs"][codec] if js else None
        rows.append([f"`{codec}`", f"{p['size_vs_float32']:.4f}", f"{1e3 * p['encode_s']:.1f}",
                     f"{1e3 * p['decode_s']:.1f}", f"{p['throughput_bytes_per_s'] / 1e6:,.0f}",
                     f"{1e3 * j['encode_s']:.1f}" if j else "-", f"{1e3 * j['decode_s']:.1f}" if j else "-",
                     f"{j['throughput_bytes_per_s'] / 1e6:,.0f}" if j else "-"])
    lines = ["# Codecs: encode + decode throughput", "", __doc__.split("\n\n")[0].replace("\n", " "), "",
             f"Medians of {rounds} interleaved rounds in Python, {max(3, rounds // 3)} in Node.", "",
             table(["codec", "size / float32", "Python encode ms", "Python decode ms", "Python MB/s",
                    "JS encode ms", "JS decode ms", "JS MB/s"], rows), "",
             f"A full sort of the {np.prod(SHAPE):,} magnitudes: Python (NumPy) "
             f"{1e3 * python['full_sort_s']:.1f} ms" + (f", JavaScript (Float32Array.sort) "
                                                         f"{1e3 * js['full_sort_s']:.1f} ms" if js else ""),
             "", "## Floors", ""]
    lines += [f"- {name}: {verdict(met)}" for name, met in floors.items()]
    return {"shape": list(SHAPE), "rounds": rounds, "python": python, "js": js, "floors": floors}, "\n".join(lines)
