"""`split.json`: the JSON Schema, the round trip, and every refusal of a bad manifest.

`jsonschema` is not a dependency, so a written manifest is checked against
`splitkeras/schema/split-manifest-v2.json` by a small validator of the
keywords that schema uses (below; a test makes sure the schema uses no
others). Where `jsonschema` is installed, it validates too.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from models import mlp_model, skip_model

import splitkeras
from splitkeras.cli import main
from splitkeras.errors import ManifestError
from splitkeras.manifest import FORMAT, FORMAT_VERSION, Manifest

SCHEMA_PATH = Path(splitkeras.__file__).parent / "schema" / "split-manifest-v2.json"


# ---- a validator for the subset of JSON Schema 2020-12 the manifest schema uses -------------------
ANNOTATIONS = {"$schema", "$id", "title", "description", "$defs"}
ASSERTIONS = {
    "$ref", "type", "const", "enum", "required", "properties", "additionalProperties",
    "items", "minItems", "minLength", "minimum", "pattern",
}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "$") -> list[str]:
    """Every way `value` breaks `schema` (empty when it is valid)."""
    errors: list[str] = []
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        errors += schema_errors(value, target, root, where)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[t](value) for t in types):
            return errors + [f"{where}: {value!r} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: '{key}' is required")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{where}: unexpected property '{key}'")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                errors += schema_errors(item, schema["items"], root, f"{where}[{index}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    return errors


def keywords(schema: Any) -> set[str]:
    """Every keyword used anywhere in `schema` (property names and $defs names excluded)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            if key in ("properties", "$defs"):
                for sub in value.values():
                    found |= keywords(sub)
            elif key in ("items", "additionalProperties"):
                found |= keywords(value)
    return found


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real split folder: three segments, a head-to-tail skip, a compiled source model."""
    folder = tmp_path_factory.mktemp("split")
    model = skip_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    splitkeras.split(model, at=["encode", "middle_2"]).save(folder)
    return folder


def read(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "split.json").read_text(encoding="utf-8"))


# ---- the schema --------------------------------------------------------------------------------------
def test_schema_is_draft_2020_12_and_versioned(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(":v2")
    assert schema["properties"]["format"]["const"] == FORMAT
    assert schema["properties"]["format_version"]["const"] == FORMAT_VERSION


def test_schema_uses_only_keywords_the_test_validator_checks(schema: dict[str, Any]) -> None:
    assert keywords(schema) <= ANNOTATIONS | ASSERTIONS


def test_a_written_manifest_is_valid(schema: dict[str, Any], written: Path) -> None:
    data = read(written)
    assert data["training"] is not None and data["model_name"] == "skip_model"
    assert schema_errors(data, schema, schema) == []


def test_a_cli_written_manifest_is_valid(
    schema: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mlp_model().save(tmp_path / "mlp.keras")
    assert main(["split", str(tmp_path / "mlp.keras"), "--at", "hidden_1", "--at", "hidden_2",
                 "-o", str(tmp_path / "out"), "--no-tfjs"]) == 0
    data = read(tmp_path / "out")
    assert data["source"]["file"] == "mlp.keras" and data["training"] is None
    assert schema_errors(data, schema, schema) == []


def test_a_manifest_with_tfjs_bundles_is_valid(schema: dict[str, Any], written: Path) -> None:
    data = read(written)
    data["segments"][0]["tfjs"] = "head_tfjs/model.json"
    assert schema_errors(data, schema, schema) == []
    assert Manifest.from_json(data).segments[0].tfjs == "head_tfjs/model.json"


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda d: d.update(format="other"), "$.format: 'other' is not 'splitkeras.split'"),
        (lambda d: d.update(format_version=1), "$.format_version: 1 is not 2"),
        (lambda d: d["segments"][1].update(host=""), "$.segments[1].host: shorter than 1"),
        (lambda d: d.pop("segments"), "$: 'segments' is required"),
        (lambda d: d["segments"][1].update(placement="cloud"), "$.segments[1].placement: 'cloud' is not one of"),
        (lambda d: d["segments"][0]["inputs"][0].update(shape=[None, "6"]), "$.segments[0].inputs[0].shape[1]: '6'"),
        (lambda d: d["model_inputs"][0].update(layout="NHWC"), "$.model_inputs[0]: unexpected property 'layout'"),
        (lambda d: d["segments"][2].update(parameters=-1), "$.segments[2].parameters: -1 < 0"),
        (lambda d: d.update(segments=d["segments"][:1]), "$.segments: fewer than 2 items"),
        (lambda d: d["source"].update(sha256="xyz"), "$.source.sha256: 'xyz' does not match"),
    ],
)
def test_the_schema_rejects_bad_manifests(schema: dict[str, Any], written: Path, change: Any, error: str) -> None:
    data = read(written)
    change(data)
    errors = schema_errors(data, schema, schema)
    assert any(e.startswith(error) for e in errors), errors


def test_jsonschema_agrees(schema: dict[str, Any], written: Path) -> None:
    import jsonschema  # a dev dependency (pyproject.toml)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(read(written))


def test_the_schema_ships_with_the_package() -> None:
    from importlib.resources import files

    text = files("splitkeras").joinpath("schema/split-manifest-v1.json").read_text(encoding="utf-8")
    assert json.loads(text)["$id"] == "urn:splitkeras:schema:split-manifest:v1"


# ---- round trip --------------------------------------------------------------------------------------
def test_from_json_of_to_json_round_trips(written: Path) -> None:
    manifest = Manifest.read(written)
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.to_json() == manifest.to_json() == read(written)


def test_write_then_read_round_trips(written: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(written / "split.json")
    path = manifest.write(tmp_path)
    assert path == tmp_path / "split.json"
    assert Manifest.read(tmp_path) == manifest
    assert not [p.name for p in tmp_path.iterdir() if p.name != "split.json"]  # no temporary left


def test_manifest_describes_the_split(written: Path) -> None:
    manifest = Manifest.read(written)
    assert manifest.cuts == ["encode", "middle_2"]
    assert [(s.name, s.placement, s.keras_file) for s in manifest.segments] == [
        ("head", "device", "head.keras"),
        ("middle", "server", "middle.keras"),
        ("tail", "device", "tail.keras"),
    ]
    assert [t.name for t in manifest.segment("tail").inputs] == ["embed", "middle_2"]
    assert manifest.label_segment.name == "tail"
    assert sum(s.parameters for s in manifest.segments) == skip_model().count_params()


# ---- refusals ------------------------------------------------------------------------------------------
def refused(data: Any) -> str:
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(data)
    return str(info.value)


def test_bad_format(written: Path) -> None:
    data = read(written)
    data["format"] = "keras.model"
    assert refused(data) == (
        'This is not a splitkeras manifest (expected "format": "splitkeras.split"). '
        "Create one with `splitkeras split MODEL --at LAYER`."
    )
    assert refused([1, 2]).startswith("This is not a splitkeras manifest")


def test_unknown_version(written: Path) -> None:
    data = read(written)
    data["format_version"] = 3
    assert refused(data) == (
        "Manifest format_version 3 is not supported by this splitkeras (it reads versions 1, 2). "
        "Re-create the split with this version."
    )


def test_version_1_files_still_load_with_derived_hosts(written: Path) -> None:
    """A version 1 split.json (no hosts) reads as before; server hosts default to names."""
    data = read(written)
    data["format_version"] = 1
    for segment in data["segments"]:
        del segment["host"]
    manifest = Manifest.from_json(data)
    assert [(s.name, s.host) for s in manifest.segments] == [
        ("head", "device"), ("middle", "middle"), ("tail", "device")]
    assert manifest.to_json()["format_version"] == 2  # written back as version 2


def test_written_manifests_name_every_host(written: Path) -> None:
    assert [s.get("host") for s in read(written)["segments"]] == ["device", "middle", "device"]


def test_a_device_segment_on_another_host_is_refused(written: Path) -> None:
    data = read(written)
    data["segments"][0]["host"] = "edge"
    assert refused(data) == "Device segment 'head' has host 'edge'; a device segment's host is \"device\"."


def test_a_first_segment_on_a_server_is_refused(written: Path) -> None:
    data = read(written)
    data["segments"][0]["placement"] = "server"
    data["segments"][0]["host"] = "head"
    assert refused(data).startswith(
        "The first segment 'head' is placed on the server, but it reads the model inputs, which "
        "must not leave the device.")


def test_missing_field(written: Path) -> None:
    data = read(written)
    del data["segments"][1]["keras_file"]
    assert refused(data).startswith("Malformed split manifest: the field 'keras_file' is missing.")


def test_invalid_value(written: Path) -> None:
    data = read(written)
    data["model_inputs"][0]["shape"] = [None, "six"]
    assert refused(data).startswith("Malformed split manifest: a field has an invalid value (")


def test_segment_input_nobody_produces(written: Path) -> None:
    data = read(written)
    data["segments"][1]["inputs"][0]["name"] = "nowhere"
    assert refused(data) == (
        "Segment 'middle' takes 'nowhere', which no earlier segment produces and which is not a "
        "model input."
    )


def test_segment_input_produced_only_later(written: Path) -> None:
    data = read(written)
    data["segments"][0]["inputs"][0]["name"] = "middle_2"  # made by the middle, after the head
    assert refused(data).startswith("Segment 'head' takes 'middle_2', which no earlier segment produces")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(segments=d["segments"][:1], cuts=[]), "A split manifest needs at least two segments."),
        (lambda d: d.update(cuts=["encode"]),
         "The manifest lists 1 cut(s) for 3 segments; expected one cut fewer than segments."),
        (lambda d: d["segments"][2].update(name="head"), "Segment name 'head' appears twice."),
        (lambda d: d["segments"][1].update(placement="cloud"),
         "Segment 'middle' has placement 'cloud'; expected one of ('device', 'server')."),
        (lambda d: d["model_outputs"][0].update(name="scores"), "No segment produces the model outputs ['scores']."),
    ],
)
def test_inconsistent_manifest(written: Path, change: Any, message: str) -> None:
    data = copy.deepcopy(read(written))
    change(data)
    assert refused(data) == message


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"^No split manifest at '.*split\.json'\. "
                                            r"Create one with `splitkeras split MODEL --at LAYER -o "):
        Manifest.read(tmp_path)


def test_unreadable_manifest(tmp_path: Path) -> None:
    (tmp_path / "split.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"^Cannot read split manifest '.*split\.json': Expecting property name"):
        Manifest.read(tmp_path)


def test_missing_segment_file(written: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("split.json", "head.keras", "middle.keras"):
        (folder / name).write_bytes((written / name).read_bytes())
    with pytest.raises(
        ManifestError,
        match=re.escape(f"Segment 'tail' names 'tail.keras', which is missing from '{folder}'."),
    ):
        splitkeras.load_split(folder)
    # Loading only the segments one side needs does not look for the others.
    server_side = splitkeras.load_split(folder, placements=["server"])
    assert server_side["middle"].model is not None and server_side["tail"].model is None


def test_the_documented_example_is_valid(schema: dict[str, Any]) -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "manifest.md"
    example = json.loads(docs.read_text(encoding="utf-8").split("```json\n", 1)[1].split("```", 1)[0])
    assert schema_errors(example, schema, schema) == []
    manifest = Manifest.from_json(example)
    assert [t.name for t in manifest.segment("tail").inputs] == ["embed", "middle_2"]
