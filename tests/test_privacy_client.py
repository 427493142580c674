"""The defences in `DeviceClient`, against the in-process server app (ASGI): off is
bitwise today's step; on, what reaches the server is what the defence promises."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from client_support import DATA, make_split_folder

from splitkeras import wire
from splitkeras.client import Transport
from splitkeras.privacy.defences import ActivationNoise, GradientNoise, MaxNorm, NoPeek, RandomizedResponse

KEY = "privacy-key"
EPOCH = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("privacy-splits")
    return {mode: make_split_folder(root / mode, mode) for mode in ("u_shaped", "labels_on_server")}


class Recorder(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.requests: list[tuple[str, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.url.path, request.read()))
        return self.inner.handle_request(request)

    def tensors(self, route: str) -> list[dict[str, np.ndarray]]:
        return [wire.decode(body)[0] for path, body in self.requests if path.endswith(route)]


def _train(template: Path, tmp_path: Path, name: str, defences: Any) -> tuple[Any, Recorder, dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from server_app import ServerSettings, create_app
    from splitkeras.client import DeviceClient

    folder = Path(shutil.copytree(template, tmp_path / name))
    with TestClient(create_app(ServerSettings(split_dir=folder, key=KEY, checkpoint_every=1000))) as server:
        recorder = Recorder(server._transport)
        transport = Transport("http://testserver", key=KEY, retries=0, http_transport=recorder)
        client = DeviceClient(folder, "http://testserver", transport=transport, defences=defences)
        client.compile()
        history = client.fit(*DATA, **EPOCH)
        result = {"predictions": client.predict(DATA[0], verbose=0), "history": history.history,
                  "device": [w for s in client.split.segments if s.model is not None for w in s.model.get_weights()]}
        client.close()
    return client, recorder, result


@pytest.mark.parametrize("mode", ["u_shaped", "labels_on_server"])
def test_defences_off_are_bitwise_todays_step(templates: dict[str, Path], tmp_path: Path, mode: str) -> None:
    off = [ActivationNoise(clip=None, sigma=0.0), NoPeek(alpha=0.0)]
    off += [MaxNorm(strength=0.0), GradientNoise(scale=0.0)] if mode == "u_shaped" else \
        [RandomizedResponse(epsilon=float("inf"))]
    _, plain_bodies, plain = _train(templates[mode], tmp_path, "plain", None)
    _, off_bodies, turned_off = _train(templates[mode], tmp_path, "off", off)
    on_defence = MaxNorm(seed=0) if mode == "u_shaped" else RandomizedResponse(epsilon=1.0, seed=0)
    _, _, on = _train(templates[mode], tmp_path, "on", [on_defence])
    assert [b for _, b in off_bodies.requests if b[:1] != b"{"] == [b for _, b in plain_bodies.requests
                                                                    if b[:1] != b"{"]
    assert np.array_equal(plain["predictions"], turned_off["predictions"])
    assert all(np.array_equal(a, b) for a, b in zip(plain["device"], turned_off["device"]))
    timing = {"ms_per_sample"}  # wall-clock: the only figure allowed to differ
    assert {k: v for k, v in plain["history"].items() if k not in timing} == \
        {k: v for k, v in turned_off["history"].items() if k not in timing}
    assert not np.array_equal(plain["predictions"], on["predictions"])  # the comparison can fail


def test_activation_noise_reaches_the_server_clipped_and_noised(templates: dict[str, Path],
                                                              tmp_path: Path) -> None:
    _, clipped, _ = _train(templates["u_shaped"], tmp_path, "clip", [ActivationNoise(clip=0.05, sigma=0.0)])
    sent = np.concatenate([t["encode"] for t in clipped.tensors("/forward")])
    norms = np.linalg.norm(sent.astype(np.float64), axis=1)
    assert np.all(norms <= 0.05 * (1 + 1e-6)) and np.mean(np.isclose(norms, 0.05, rtol=1e-6)) > 0.5
    _, noised, _ = _train(templates["u_shaped"], tmp_path, "noise", [ActivationNoise(clip=0.05, sigma=2.0, seed=1)])
    sent = np.concatenate([t["encode"] for t in noised.tensors("/forward")])
    assert abs(np.std(sent) / (2.0 * 0.05) - 1) < 0.1  # the noise dwarfs the clipped signal


def test_randomized_response_sends_flipped_labels(templates: dict[str, Path], tmp_path: Path) -> None:
    _, recorder, result = _train(templates["labels_on_server"], tmp_path, "rr",
                                 [RandomizedResponse(epsilon=0.5, seed=3)])
    sent = np.concatenate([next(v for k, v in t.items() if k.startswith("label:")) for t in
                           recorder.tensors("/train")])
    truth = np.concatenate([DATA[1]] * 2)
    keep = np.exp(0.5) / (np.exp(0.5) + 2)  # 0.452
    assert abs(np.mean(sent == truth) - keep) < 0.15  # 128 draws: 3.4 standard deviations
    assert np.isfinite(result["history"]["loss"]).all()


def test_max_norm_and_nopeek_train_through_the_server(templates: dict[str, Path], tmp_path: Path) -> None:
    nopeek = NoPeek(alpha=1.0)
    _, recorder, result = _train(templates["u_shaped"], tmp_path, "mn", [MaxNorm(seed=0), nopeek])
    _, plain, _ = _train(templates["u_shaped"], tmp_path, "plain", None)
    assert len(nopeek.last_dcor) == 8 and all(0 <= d <= 1 for d in nopeek.last_dcor)
    assert np.isfinite(result["history"]["loss"]).all()
    sent, honest = recorder.tensors("/backward"), plain.tensors("/backward")
    assert len(sent) == len(honest) == 8
    assert not np.array_equal(sent[0]["middle_2"], honest[0]["middle_2"])  # perturbed from step 0
    # max-norm only rescales each sample's gradient: at step 0 the directions are the same
    a, b = sent[0]["middle_2"].astype(np.float64), honest[0]["middle_2"].astype(np.float64)
    cosine = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    assert np.allclose(np.abs(cosine[np.linalg.norm(b, axis=1) > 0]), 1.0, atol=1e-5)
