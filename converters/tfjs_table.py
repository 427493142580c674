"""The table of what the TF.js exporter writes, shared with the JavaScript runtime.

`mobile_export/src/layers/table.json` is the one source of truth: it lists every Keras layer
the exporter accepts (with the TF.js class it becomes, built in or registered by the runtime's
`src/layers/`), the `keras.ops` operations, the activations, the classes and activations the
runtime registers, and the layers refused outright. `converters.SUPPORTED_LAYERS` and the
refusal messages are read from it; `mobile_export/test/layers.test.js` checks that the runtime
registers exactly what it lists.

Example::

    >>> from converters.tfjs_table import TABLE
    >>> TABLE["layers"]["Normalization"]["custom"]
    'SplitkerasNormalization'
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["TABLE", "TABLE_PATH", "load_table"]


def _table_path() -> Path:
    try:  # an installed wheel ships mobile_export's src/layers/*.json as package data
        return Path(str(resources.files("mobile_export") / "src" / "layers" / "table.json"))
    except ModuleNotFoundError:  # pragma: no cover - a checkout without mobile_export on the path
        return Path(__file__).resolve().parents[1] / "mobile_export" / "src" / "layers" / "table.json"


TABLE_PATH = _table_path()


def load_table(path: Path | None = None) -> dict[str, Any]:
    """The parsed table (`mobile_export/src/layers/table.json` unless `path` is given)."""
    return json.loads((path or TABLE_PATH).read_text(encoding="utf-8"))


TABLE: dict[str, Any] = load_table()
