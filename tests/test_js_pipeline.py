"""The JavaScript device runtime pipelined (`SplitDevice.fit({pipelineDepth: 2})`,
mobile_export/src/pipeline.js) against a REAL `splitkeras serve` (subprocess on 127.0.0.1,
`--max-pending-steps 4`), under Node with the real @tensorflow/tfjs
(`mobile_export/tools/pipeline_fit.mjs`): every step the device ran is applied on the server
exactly once (its `applied_steps`), none is left pending, and the loss falls. A
server with `--max-pending-steps 1` caps the device at depth 1 with a warning, and trains
the same."""

from __future__ import annotations

import signal
from pathlib import Path

import keras
import numpy as np
import pytest
from js_support import MOBILE, require_node, run_driver, tensor
from live_server import KEY, Server
from models import skip_model

import splitkeras
from splitkeras.cli import main as cli_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

DRIVER = MOBILE / "tools" / "pipeline_fit.mjs"


@pytest.mark.parametrize("max_pending,expected_depth", [(4, 2), (1, 1)])
def test_js_pipelined_fit_applies_every_step_once_and_learns(tmp_path: Path, max_pending: int,
                                                            expected_depth: int) -> None:
    node = require_node()
    model = skip_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    out, app = tmp_path / "split", tmp_path / "app"
    splitkeras.split(model, at=["encode", "middle_2"]).save(out, tfjs=True)
    assert cli_main(["export", str(out), "-o", str(app)]) == 0
    rng = np.random.default_rng(3)
    x = rng.standard_normal((96, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5).astype("int32")  # learnable classes 0-2
    server = Server(out, checkpoint_every=1000, args=["--max-pending-steps", str(max_pending)]).start()
    try:
        server.wait_ready()
        job = {"app_dir": str(app), "server_url": server.url, "key": KEY, "seed": 2, "batch_size": 8,
               "epochs": 3, "pipeline_depth": 2, "train_x": tensor(x), "train_y": tensor(y)}
        result = run_driver(node, job, tmp_path, DRIVER)
    finally:
        server.stop(signal.SIGTERM, timeout=30)
    assert result["steps"] == 36  # 12 batches x 3 epochs
    state = result["session_state"]
    assert state["applied_steps"] == 36  # every step the device ran, applied once
    assert state["pending_step"] is None and state["pending_steps"] == []
    assert result["stats"]["recoveries"] == 0 and result["stats"]["retries"] == 0
    losses = result["history"]["loss"]
    assert losses[-1] < losses[0], losses
    if expected_depth == 1:
        assert result["warnings"] == ["pipelineDepth 2 is capped at 1: the server takes at most that many "
                                      "steps in flight per session (max_pending_steps middle: 1; "
                                      "`splitkeras serve --max-pending-steps`)."]
    else:
        assert result["warnings"] == []
