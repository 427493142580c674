"""The device page (`splitkeras serve --device-page`): a browser tab as the device.

Routes, all under `/device/` (never under `/v1`), mounted only when the flag is on:

* `GET /device/` and `GET /device/<file>`: the built page (index.html, its JS bundle, the
  TF.js wasm binaries), public: it holds no secret. Only the files the build wrote are served,
  each with its content type; any other name is a 404.
* `GET /device/split/split.json` and `GET /device/split/<bundle file>`: the manifest and the
  TF.js bundles of the device segments, read-only, with the server key (`Authorization:
  Bearer <key>`). Only the files the manifest names (each segment's `model.json` and the weight
  files its `weightsManifest` lists) exist here: the path is looked up in that table, never
  joined to the folder, so there is no traversal.
* `GET /device/data`: the page's training data as one safetensors body (`x_train`,
  `y_train`, `x_test`, `y_test`), with the key. For the split of `splitkeras demo` it is
  scikit-learn's digits with the demo's preprocessing and train/test split
  (`splitkeras.demo.digits_data`); for any other split a 404 `no_page_data` that tells the
  user to choose a file on the page.

The key never travels in the page: `splitkeras serve` prints `/device/#key=<key>` (a fragment
is not sent to the server) and the page asks for it when the fragment is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from splitkeras.manifest import Manifest

__all__ = ["PAGE_PREFIX", "CONTENT_TYPES", "PageNotBuilt", "default_page_dir", "check_page_dir",
           "page_files", "bundle_files", "missing_bundles", "page_data", "device_page_router"]

PAGE_PREFIX = "/device"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".wasm": "application/wasm",
                 ".json": "application/json", ".bin": "application/octet-stream",
                 ".safetensors": "application/vnd.splitkeras.safetensors"}
BUILD_HINT = ("build it with `npm --prefix mobile_export run build:page` (scripts/setup does), or set "
              "SPLITKERAS_DEVICE_PAGE_DIR to a folder holding a built page")
# what every answer of the page routes carries: no sniffing, no framing by other sites, no caching
# of the key-guarded files, and a page that may only talk to its own origin
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}
PAGE_CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


class PageNotBuilt(Exception):
    """The device page's folder lacks the built page."""


def default_page_dir() -> Path:
    """Where `npm run build:page` writes the page: mobile_export/dist/device-page (in a
    checkout, or in an installed wheel built after the page was)."""
    import mobile_export

    return Path(mobile_export.__file__).resolve().parent / "dist" / "device-page"


def check_page_dir(folder: Path) -> Path:
    """`folder` if it holds a built page (index.html and device_page.js), else `PageNotBuilt`
    with the one line that says how to build it."""
    missing = [name for name in ("index.html", "device_page.js") if not (folder / name).is_file()]
    if missing:
        raise PageNotBuilt(f"--device-page: the device page is not built ({folder / missing[0]} is "
                           f"missing); {BUILD_HINT}")
    return folder


def page_files(folder: Path) -> dict[str, Path]:
    """The built page's files by name: the plain files directly in `folder` with a known type."""
    return {path.name: path for path in sorted(folder.iterdir())
            if path.is_file() and path.suffix in CONTENT_TYPES}


def bundle_files(split_dir: Path, manifest: Manifest) -> dict[str, Path]:
    """`split.json` and every file of the device segments' TF.js bundles the manifest names
    (each `model.json` and the weight files beside it that its `weightsManifest` lists), by
    their path relative to the split folder: the table the bundle route looks paths up in."""
    split_dir = Path(split_dir).resolve()
    files = {"split.json": split_dir / "split.json"}
    for entry in manifest.segments:
        if entry.placement != "device" or not entry.tfjs:
            continue
        model_json = (split_dir / entry.tfjs).resolve()
        if not model_json.is_relative_to(split_dir) or not model_json.is_file():
            continue  # the page reports the segment's bundle as missing
        files[model_json.relative_to(split_dir).as_posix()] = model_json
        try:
            groups = json.loads(model_json.read_text()).get("weightsManifest", [])
        except (OSError, ValueError):
            continue
        for group in groups:
            for name in group.get("paths", []):
                weights = (model_json.parent / str(name)).resolve()
                if weights.parent == model_json.parent and weights.is_file():  # beside model.json only
                    files[weights.relative_to(split_dir).as_posix()] = weights
    return files


def missing_bundles(split_dir: Path, manifest: Manifest) -> list[str]:
    """The device segments without a TF.js `model.json` the page could load (in manifest order)."""
    split_dir = Path(split_dir).resolve()
    served = bundle_files(split_dir, manifest)
    return [entry.name for entry in manifest.segments if entry.placement == "device" and (
        not entry.tfjs or not (split_dir / entry.tfjs).resolve().is_relative_to(split_dir)
        or (split_dir / entry.tfjs).resolve().relative_to(split_dir).as_posix() not in served)]


def is_demo_split(manifest: Manifest) -> bool:
    """The split `splitkeras demo` writes: its source file, 8x8x1 images in, 10 classes out."""
    from splitkeras.demo import DEMO_MODEL_FILE

    source = manifest.source if isinstance(manifest.source, dict) else {}
    inputs, outputs = manifest.model_inputs, manifest.model_outputs
    return (source.get("file") == DEMO_MODEL_FILE and len(inputs) == 1 and len(outputs) == 1
            and list(inputs[0].shape) == [None, 8, 8, 1] and list(outputs[0].shape) == [None, 10])


def page_data(manifest: Manifest) -> bytes | None:
    """The page's data as one safetensors body, or None for a split that has none: for the
    demo's split, `splitkeras.demo.digits_data()` (the demo's preprocessing and split)."""
    if not is_demo_split(manifest):
        return None
    from splitkeras import wire
    from splitkeras.demo import digits_data

    (x_train, y_train), (x_test, y_test) = digits_data()
    return wire.encode({"x_train": x_train, "y_train": y_train.astype("int32"), "x_test": x_test,
                        "y_test": y_test.astype("int32")}, metadata={"data": "sklearn digits, splitkeras demo"})


def _file(path: Path, *, private: bool) -> Response:
    headers = dict(SECURITY_HEADERS, **{"Cache-Control": "no-store" if private else "no-cache"})
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = PAGE_CSP
    return Response(path.read_bytes(), media_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
                    headers=headers)


def _not_found(code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=404, headers=SECURITY_HEADERS)


def device_page_router(page_dir: Path, split_dir: Path, manifest: Manifest,
                       key_matches: Callable[[Request, str | None], bool]) -> APIRouter:
    """The `/device` routes for the page built in `page_dir` and the split in `split_dir`.

    `key_matches(request, key)` tells whether `key` is the server key (the service holds it).
    The tables (page files, bundle files, the data body) are made once, here."""
    check_page_dir(page_dir)
    page = page_files(page_dir)
    bundles = bundle_files(split_dir, manifest)
    data = page_data(manifest)
    router = APIRouter(prefix=PAGE_PREFIX, tags=["device page"], include_in_schema=False)

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": {"code": "unauthorized", "message": (
            "The split's files need the server key as 'Authorization: Bearer <key>': open the "
            "page with the /device/#key=... address `splitkeras serve` prints, or paste the key "
            "(SPLIT_DIR/.splitkeras/server.key) into the page.")}},
            status_code=401, headers=dict(SECURITY_HEADERS, **{"WWW-Authenticate": "Bearer"}))

    def given(authorization: str | None) -> str | None:
        if authorization and authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        return None

    @router.get("")
    async def root() -> Any:
        return RedirectResponse(f"{PAGE_PREFIX}/", status_code=308)

    @router.get("/")
    async def index() -> Any:
        return _file(page["index.html"], private=False)

    @router.get("/split/{path:path}")
    async def bundle(path: str, request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
        if not key_matches(request, given(authorization)):
            return unauthorized()
        found = bundles.get(path)
        if found is None:
            return _not_found("not_found", f"'{path}' is not a file of the split's device bundles; the "
                              f"page may read: {', '.join(sorted(bundles))}")
        return _file(found, private=True)

    @router.get("/data")
    async def training_data(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
        if not key_matches(request, given(authorization)):
            return unauthorized()
        if data is None:
            return _not_found("no_page_data", "This split has no data of its own for the page (only the "
                              "split of `splitkeras demo` has: the digits set). Choose a .safetensors file "
                              "with x_train and y_train (and x_test, y_test) on the page; docs/protocol.md, "
                              "'The device page', says how to write one.")
        headers = dict(SECURITY_HEADERS, **{"Cache-Control": "no-store"})
        return Response(data, media_type=CONTENT_TYPES[".safetensors"], headers=headers)

    @router.get("/{name}")
    async def page_file(name: str) -> Any:
        found = page.get(name)
        if found is None:
            return _not_found("not_found", f"'{name}' is not a file of the device page")
        return _file(found, private=False)

    return router
