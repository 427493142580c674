"""`splitkeras export`: the app bundle of a split folder (no server, no node here; the bundle is
trained by the JavaScript runtime in tests/test_js_device.py)."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import splitkeras  # noqa: E402
from converters.tfjs_bundle import read_bundle_weights  # noqa: E402
from splitkeras.cli import main  # noqa: E402
from splitkeras.cli.export import export_app, runtime_files  # noqa: E402


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-shaped split saved WITHOUT TF.js bundles: export has to make them."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,), name="features")
    h = keras.layers.Dense(3, name="h")(inputs)
    m = keras.layers.Dense(3, activation="relu", name="m")(h)
    out = keras.layers.Dense(2, activation="softmax", name="out")(m)
    model = keras.Model(inputs, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    folder = tmp_path_factory.mktemp("export") / "split"
    splitkeras.split(model, at=["h", "m"]).save(folder)
    return folder


def test_export_makes_missing_bundles_and_the_runtime(split_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(split_dir), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    app = split_dir / "app"
    assert summary["app"] == str(app)
    assert summary["device_segments"] == {"head": "exported (float32)", "tail": "exported (float32)"}
    manifest = json.loads((app / "split.json").read_text())
    assert [s.get("tfjs") for s in manifest["segments"]] == ["head_tfjs/model.json", None,
                                                             "tail_tfjs/model.json"]
    head = splitkeras.load_split(split_dir)["head"].model
    weights = read_bundle_weights(app / "head_tfjs")
    np.testing.assert_array_equal(weights["h/kernel"], keras.ops.convert_to_numpy(head.layers[1].kernel))
    package = json.loads((app / "splitkeras-device" / "package.json").read_text())
    assert package["main"] == "src/runtime.js" and "scripts" not in package
    assert (app / "splitkeras-device" / "src" / "node_io.js").exists()  # Node only, through exports
    assert "tail: bundleResourceIO(require('./tail_tfjs/model.json')" in (app / "assets.js").read_text()


def test_export_again_replaces_its_own_output_and_can_quantize(split_dir: Path) -> None:
    out = split_dir.parent / "app_f16"
    export_app(split_dir, out)
    (out / "stale.txt").write_text("from an older export")
    summary = export_app(split_dir, out, quantization="float16")
    assert not (out / "stale.txt").exists()
    assert summary["device_segments"]["head"] == "exported (float16)"
    spec = json.loads((out / "head_tfjs" / "model.json").read_text())["weightsManifest"][0]["weights"]
    assert {w["quantization"]["dtype"] for w in spec} == {"float16"}


def test_export_refuses_a_foreign_folder_in_one_line(split_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    foreign = split_dir.parent / "my_app"
    foreign.mkdir()
    (foreign / "App.js").write_text("// someone's app")
    assert main(["export", str(split_dir), "-o", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and was not written by `splitkeras export`" in err
    assert (foreign / "App.js").exists()
    assert main(["export", str(split_dir.parent / "missing")]) == 1
    assert "No split manifest" in capsys.readouterr().err


def test_the_runtime_is_the_installed_mobile_export_package(split_dir: Path) -> None:
    """Found through importlib.resources, not a path into the source tree; and everything
    export copies is package data in pyproject.toml, so a wheel holds it too."""
    import mobile_export

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    runtime = runtime_files()
    assert Path(str(runtime)) == Path(mobile_export.__file__).parent
    out = split_dir.parent / "app_files"
    export_app(split_dir, out)
    copied = sorted(p.relative_to(out / "splitkeras-device").as_posix()
                    for p in (out / "splitkeras-device").rglob("*") if p.is_file())
    assert "src/runtime.js" in copied and "README.md" in copied and "package.json" in copied
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["mobile_export"]
    assert all(any(fnmatch.fnmatch(f, glob) for glob in shipped) for f in copied), (copied, shipped)


def test_export_without_the_runtime_is_one_error_line(split_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("splitkeras.cli.export.RUNTIME_PACKAGE", "no_such_runtime_package")
    assert main(["export", str(split_dir), "-o", str(split_dir.parent / "app_none")]) == 1
    err = capsys.readouterr().err
    assert err == ("error: The JavaScript runtime (the 'no_such_runtime_package' package) is not installed; "
                   "export from a splitkeras checkout or a complete installation\n")


def test_the_app_bundle_is_readable_and_its_runtime_is_the_package(split_dir: Path) -> None:
    """split.json 0644 (not the 0600 of the atomic write); the runtime copy has the published
    package's exports and declarations (./node, for Node only, included); the app README is the
    one for app developers."""
    out = split_dir.parent / "app_package"
    export_app(split_dir, out)
    assert (out / "split.json").stat().st_mode & 0o777 == 0o644
    published = json.loads((Path(__file__).resolve().parents[1] / "mobile_export" / "package.json").read_text())
    copy = json.loads((out / "splitkeras-device" / "package.json").read_text())
    assert copy["exports"] == published["exports"]
    assert copy["exports"]["."]["react-native"] == "./src/runtime.js"
    for key in ("name", "version", "type", "types", "react-native", "browser", "peerDependencies",
                "peerDependenciesMeta", "sideEffects"):
        assert copy[key] == published[key], key
    assert "devDependencies" not in copy and "scripts" not in copy
    src = sorted(p.name for p in (out / "splitkeras-device" / "src").iterdir())
    assert "runtime.d.ts" in src and "kernels.js" in src and "node_io.d.ts" in src
    readme = (out / "README.md").read_text()
    assert "--cors-origin" in readme and "asyncStorageIO" in readme and "## Node example" in readme


def test_the_exported_runtime_installs_as_a_package(split_dir: Path, tmp_path: Path) -> None:
    """`npm pack` of the exported copy, `npm install` of the tarball offline into a fresh project
    (TF.js linked from mobile_export/node_modules), and `import { SplitDevice } from
    "splitkeras-device"` in Node."""
    import shutil
    import subprocess

    npm, node = shutil.which("npm"), shutil.which("node")
    tfjs = Path(__file__).resolve().parents[1] / "mobile_export" / "node_modules" / "@tensorflow"
    if not npm or not node or not tfjs.is_dir():
        pytest.skip("npm/node or mobile_export/node_modules missing: run scripts/setup")
    out = split_dir.parent / "app_install"
    export_app(split_dir, out)
    packed = subprocess.run([npm, "pack", "--json", "--pack-destination", str(tmp_path), "--loglevel=error"],
                            cwd=out / "splitkeras-device", check=True, capture_output=True, text=True)
    tarball = tmp_path / json.loads(packed.stdout)[0]["filename"]
    project = tmp_path / "consumer"
    project.mkdir()
    (project / "package.json").write_text('{"name": "consumer", "private": true, "type": "module"}')
    subprocess.run([npm, "install", "--offline", "--no-audit", "--no-fund", "--no-save", "--legacy-peer-deps",
                    "--ignore-scripts", "--loglevel=error", str(tarball)], cwd=project, check=True,
                   capture_output=True)
    (project / "node_modules" / "@tensorflow").symlink_to(tfjs, target_is_directory=True)
    script = ("import * as tf from '@tensorflow/tfjs';\n"
              "import { SplitDevice, registerTrainingKernels } from 'splitkeras-device';\n"
              "registerTrainingKernels(tf);\n"
              "console.log(typeof SplitDevice.create, import.meta.resolve('splitkeras-device'));\n")
    (project / "check.mjs").write_text(script)
    result = subprocess.run([node, "check.mjs"], cwd=project, check=True, capture_output=True, text=True)
    kind, resolved = result.stdout.split()[-2:]
    assert kind == "function"
    assert resolved.endswith("/consumer/node_modules/splitkeras-device/src/runtime.js")
