"""The public surface of `splitkeras`: small, lazy, and every name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import splitkeras

PUBLIC = {
    "__version__", "split", "load_split", "load_model", "Split", "DeviceClient", "Segment",
    "Manifest", "TensorSpec", "SplitKerasError", "CutError", "ExportError", "ManifestError",
    "ModelLoadError", "ProtocolError", "TrainingError", "UnsupportedModelError", "WireFormatError",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(splitkeras.__all__) == PUBLIC
    assert len(splitkeras.__all__) == len(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC - {"__version__"}))
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(splitkeras, name)
    assert getattr(value, "__name__", name) == name


def test_every_error_is_a_splitkeras_error() -> None:
    for name in PUBLIC:
        value = getattr(splitkeras, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, splitkeras.SplitKerasError)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Trainer'"):
        splitkeras.Trainer  # noqa: B018


def test_importing_the_package_does_not_load_tensorflow() -> None:
    """`splitkeras --help` and the wire format stay fast: TensorFlow loads on first use."""
    code = "import sys, splitkeras, splitkeras.wire, splitkeras.errors; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
