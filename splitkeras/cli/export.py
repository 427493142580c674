"""`splitkeras export SPLIT_DIR`: the app bundle a React Native app ships.

The bundle (default `SPLIT_DIR/app/`) holds everything the device needs and
nothing it does not (no server segment, no labels):

    app/
      split.json                    the manifest, `segments[].tfjs` naming the bundles
      head_tfjs/, tail_tfjs/        TF.js layers-model bundles of the device segments
      assets.js                     `require`s of those files for React Native (Metro)
      README.md                     for the app's developers: install, backends, CORS and
                                    TLS, keys, persistence of trained weights, examples
      splitkeras-device/            the JavaScript runtime as an npm package (src/*.js and
                                    their .d.ts, README.md, package.json with the same
                                    `exports` as the published package)

The TF.js bundles are copied from the split folder when `splitkeras split` wrote
them, else exported from the segments' `.keras` files (`converters.export_tfjs`).

Example:
    $ splitkeras export out                  # -> out/app/
    $ splitkeras export out -o ../MyApp/split --quantization float16
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitkeras.cli._common import CliError, add_unsafe

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["export_app", "register", "runtime_files"]

RUNTIME_PACKAGE = "mobile_export"  # the npm package's folder, shipped as package data
RUNTIME_NAME = "splitkeras-device"
MARKER = ".splitkeras-app.json"
# Node's bundle loading (splitkeras-device/node) ships too: the package's `exports` gives it to
# Node only ("node" condition), so no app bundler ever pulls node:fs in
_NODE_ONLY: set[str] = set()
_NODE_ONLY_EXPORTS: set[str] = set()
APP_README = "app_template/README.md"  # in the runtime package, written to the app folder


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"export: '{out}' is a file; give a folder with -o")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).exists() and not force:
            raise CliError(f"export: '{out}' is not empty and was not written by `splitkeras export`; "
                         "choose another folder with -o, or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _copy_bundle(source: Path, target: Path) -> None:
    """Copy a TF.js bundle folder: model.json and the shards its manifest lists."""
    from splitkeras.errors import ExportError

    model_json = json.loads((source / "model.json").read_text(encoding="utf-8"))
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model.json", target / "model.json")
    for group in model_json.get("weightsManifest", []):
        for relative in group.get("paths", []):
            shard = (source / relative).resolve()
            if shard.parent != source.resolve() or not shard.is_file():
                raise ExportError(f"The TF.js bundle {source} lists the weight file {relative!r}, "
                                  "which is missing or outside the bundle; re-run `splitkeras split`")
            shutil.copy2(shard, target / shard.name)


def runtime_files() -> Traversable:
    """The JavaScript runtime as installed: the `mobile_export` package's files
    (`src/*.js`, `src/*.d.ts`, `README.md`, `package.json`, `app_template/README.md`)."""
    from splitkeras.errors import ExportError

    try:
        return resources.files(RUNTIME_PACKAGE)
    except ModuleNotFoundError:
        raise ExportError(f"The JavaScript runtime (the '{RUNTIME_PACKAGE}' package) is not installed; "
                          "export from a splitkeras checkout or a complete installation") from None


def _copy_file(source: Traversable, target: Path) -> None:
    with resources.as_file(source) as path:  # the file itself when installed as files
        shutil.copy2(path, target)


def _copy_runtime(target: Path) -> list[str]:
    from splitkeras.errors import ExportError

    runtime = runtime_files()
    src = runtime / "src"
    sources = sorted((p for p in src.iterdir() if p.name.endswith((".js", ".d.ts")) and p.is_file()),
                     key=lambda p: p.name) if src.is_dir() else []
    if not any(p.name == "runtime.js" for p in sources):
        raise ExportError(f"The JavaScript runtime is missing from {src}; export "
                          "from a splitkeras checkout or a complete installation")
    (target / "src").mkdir(parents=True)
    copied = []
    for source in sources:
        if source.name in _NODE_ONLY:
            continue
        _copy_file(source, target / "src" / source.name)
        copied.append(source.name)
    layers = src / "layers"  # the layer classes TF.js lacks, and their table (src/layers/table.json)
    if layers.is_dir():
        (target / "src" / "layers").mkdir()
        for source in sorted((p for p in layers.iterdir() if p.name.endswith((".js", ".json")) and p.is_file()),
                             key=lambda p: p.name):
            _copy_file(source, target / "src" / "layers" / source.name)
            copied.append(f"layers/{source.name}")
    readme = runtime / "README.md"
    if readme.is_file():
        _copy_file(readme, target / "README.md")
    package = json.loads((runtime / "package.json").read_text(encoding="utf-8"))
    # the published package's fields (entry points, conditions, types, peers), less what only
    # its development needs and the Node-only entry point this copy does not hold
    slim = {key: value for key, value in package.items()
            if key not in ("scripts", "devDependencies", "private")}
    slim["main"] = "src/runtime.js"
    exports = slim.get("exports")
    if isinstance(exports, dict):
        slim["exports"] = {k: v for k, v in exports.items() if k not in _NODE_ONLY_EXPORTS}
    else:
        slim["exports"] = {".": "./src/runtime.js"}
    (target / "package.json").write_text(json.dumps(slim, indent=2) + "\n", encoding="utf-8")
    return copied


def _copy_app_readme(out: Path) -> bool:
    readme = runtime_files().joinpath(*APP_README.split("/"))
    if not readme.is_file():
        return False
    _copy_file(readme, out / "README.md")
    return True


def _assets_js(bundles: dict[str, list[str]]) -> str:
    lines = [
        "// Generated by `splitkeras export`: the app bundle's files for React Native (Metro).",
        "// metro.config.js must bundle the weight shards: add 'bin' to resolver.assetExts.",
        "import { bundleResourceIO } from '@tensorflow/tfjs-react-native';",
        "",
        "export const manifest = require('./split.json');",
        "",
        "export const models = {",
    ]
    for name, files in bundles.items():
        shards = ", ".join(f"require('./{name}_tfjs/{shard}')" for shard in files)
        lines.append(f"  {name}: bundleResourceIO(require('./{name}_tfjs/model.json'), [{shards}]),")
    lines += ["};", ""]
    return "\n".join(lines)


def export_app(split_dir: str | Path, output: str | Path | None = None, *,
               quantization: str | None = None, force: bool = False,
               unsafe_deserialization: bool = False) -> dict[str, Any]:
    """Assemble the app bundle of a split folder; returns a summary (paths, sizes).

    Args:
        split_dir: a folder written by `splitkeras split` (or `Split.save`).
        output: the app folder (default `SPLIT_DIR/app`); replaced when an earlier export wrote it.
        quantization: re-export the device segments with "float16", "uint8" or "uint16" weights
            (TF.js dequantizes them to float32 when loading; training then starts from those).
        force: replace a non-empty output folder that `splitkeras export` did not write.
        unsafe_deserialization: allow Lambda layers when exporting from `.keras` files.

    Example:
        >>> export_app("out")["app"]        # doctest: +SKIP
        'out/app'
    """
    from splitkeras.manifest import Manifest

    folder = Path(split_dir)
    manifest = Manifest.read(folder)
    out = Path(output) if output is not None else folder / "app"
    if out.resolve() == folder.resolve():
        raise CliError("export: the app folder cannot be the split folder itself; use -o")
    _prepare(out, force)
    bundles: dict[str, list[str]] = {}
    exported: dict[str, str] = {}
    for entry in manifest.segments:
        if entry.placement != "device":
            continue
        target = out / f"{entry.name}_tfjs"
        source = folder / entry.tfjs if entry.tfjs else None
        if quantization is None and source is not None and source.exists():
            _copy_bundle(source.parent, target)
            exported[entry.name] = "copied"
        else:
            from converters import export_tfjs
            from converters.keras_io import load_model
            from splitkeras.errors import ManifestError

            keras_file = folder / entry.keras_file
            if not keras_file.exists():
                raise ManifestError(f"Segment '{entry.name}' names '{entry.keras_file}', which is "
                                    f"missing from '{folder}'.")
            model = load_model(keras_file, compile=False,
                               unsafe_deserialization=unsafe_deserialization)
            export_tfjs(model, target, quantization=quantization,
                        metadata={"splitkeras_segment": entry.name})
            exported[entry.name] = f"exported ({quantization or 'float32'})"
        entry.tfjs = f"{entry.name}_tfjs/model.json"
        spec = json.loads((target / "model.json").read_text(encoding="utf-8"))
        bundles[entry.name] = [p for g in spec["weightsManifest"] for p in g["paths"]]
    manifest.write(out)
    # readable by the app's build and the web server that serves it (the atomic write of
    # Manifest.write leaves a 0600 temporary file)
    (out / "split.json").chmod(0o644)
    runtime = _copy_runtime(out / RUNTIME_NAME)
    _copy_app_readme(out)
    (out / "assets.js").write_text(_assets_js(bundles), encoding="utf-8")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    summary = {"app": str(out), "split_dir": str(folder), "device_segments": exported,
               "runtime": [f"{RUNTIME_NAME}/src/{name}" for name in runtime], "files": files,
               "bytes": size}
    (out / MARKER).write_text(json.dumps({k: v for k, v in summary.items() if k != "files"},
                                         indent=2) + "\n", encoding="utf-8")
    return summary


def cmd_export(args: argparse.Namespace) -> int:
    summary = export_app(args.split_dir, args.output, quantization=args.quantization,
                         force=args.force, unsafe_deserialization=args.unsafe_deserialization)
    if args.format == "json":
        print(json.dumps(summary, indent=2))
        return 0
    print(f"App bundle in {summary['app']}/ ({summary['bytes']:,} bytes)")
    for name, how in summary["device_segments"].items():
        print(f"  {name}_tfjs/   TF.js bundle of segment '{name}', {how}")
    print(f"  split.json, assets.js, {RUNTIME_NAME}/ (runtime: {len(summary['runtime'])} modules)")
    print(f"See {summary['app']}/README.md to install and train it in an app (React Native, "
          "a web page or Node).")
    return 0


def register(sub: Any) -> None:
    """Add the `export` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("export", help="assemble the app bundle: TF.js head and tail, split.json, "
                       "the JavaScript runtime")
    p.add_argument("split_dir", help="a folder written by `splitkeras split`")
    p.add_argument("-o", "--output", help="app folder to write (default: SPLIT_DIR/app)")
    p.add_argument("--quantization", choices=["float16", "uint8", "uint16"],
                   help="re-export the device segments with quantized weights (smaller download)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty output folder not written by `splitkeras export`")
    p.add_argument("--format", choices=["text", "json"], default="text")
    add_unsafe(p)
    p.set_defaults(func=cmd_export)
