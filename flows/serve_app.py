"""The inspection station's HTTP side: a FastAPI app run by uvicorn (``musc serve LINE``).

Endpoints:

- ``GET /health``: the line, its bank, the backbones and how many parts were scored;
- ``POST /score``: one part as ``multipart/form-data``: the field ``image`` (the part's image
  file; 2D lines), the field ``xyz`` (its XYZ TIFF; 3D lines, and MVTec 3D-AD images, which
  are prepared with their XYZ map) and optionally the field ``name`` (the part's name in the
  results; default the file's stem). The answer is JSON: the part's score, RsCon score, flag,
  the thresholds and where its results were written.

Bad input gets a 4xx whose ``detail`` names the problem and the fix, and the server goes on:
415 for a body that is not multipart or a file of the wrong kind, 400 for a request that
cannot be right (unknown or repeated fields, an empty file, a bad name), 422 for a missing
file or a file that cannot be used, 413 for a request larger than ``--max-request-mb``, refused
from its ``Content-Length`` or, without one, as soon as the bytes read pass the limit (nothing
larger is buffered). Parts are scored one at a time, in the order they arrive.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.serve import InspectionStation, PartFiles, PartRefused, ScoredPart, scratch_parent
from flows.settings import BankChoice, NewPartsChanges, Station, StationRun
from tasks.formats.datasets import IMAGE_SUFFIXES
from tasks.formats.image_io import TIFF_SUFFIXES
from tasks.records.result_store import RANDOM_WEIGHTS_WARNING

log = logging.getLogger("musc.serve")
FIELDS = ("image", "xyz", "name")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._/-]{0,127}$")
_CHUNK = 1 << 20
HOW = (
    "send the part as multipart/form-data with the field image (its image file), the field "
    "xyz (its XYZ TIFF) and optionally the field name"
)


class RequestTooLarge(Exception):
    """The request's body passed the size limit while it was read."""


@dataclass(frozen=True)
class BodyLimit:
    """ASGI middleware: refuse a request whose body is larger than ``limit`` bytes with 413.

    A declared ``Content-Length`` over the limit is refused before anything is read; otherwise
    the bytes are counted as the app reads them, and :class:`RequestTooLarge` is raised in the
    reader as soon as they pass the limit.
    """

    app: ASGIApp
    limit: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, with its body's bytes counted (an HTTP request's)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(self.limit)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise RequestTooLarge
            return message

        await self.app(scope, counted, send)


def problem(status: int, message: str) -> JSONResponse:
    """A 4xx/5xx answer: ``{"detail": message}``."""
    return JSONResponse({"detail": message}, status_code=status)


def too_large(limit: int) -> JSONResponse:
    """The 413 answer for a request over ``limit`` bytes."""
    return problem(
        413, f"the request is larger than the station's limit of {limit / 2**20:g} MiB: send "
        "smaller files, or start the station with a larger --max-request-mb"
    )


def create_app(station: InspectionStation, max_bytes: int) -> BodyLimit:
    """The station's ASGI app: ``/health`` and ``/score``, requests limited to ``max_bytes``."""
    app = FastAPI(title=f"musc inspection station: line {station.request.line}")

    @app.get("/health")
    def health() -> dict:
        return station.facts()

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return problem(415, f"the body is not multipart/form-data: {HOW}")
        folder = tempfile.mkdtemp(prefix="musc-upload-", dir=scratch_parent())
        form: FormData | None = None
        try:
            form = await request.form(max_files=2, max_fields=1)
            files = await save_part(form, station, folder)
            scored = await run_in_threadpool(station.score, files)
        except RequestTooLarge:
            return too_large(max_bytes)
        except (MultiPartException, HTTPException) as error:
            reason = getattr(error, "detail", None) or getattr(error, "message", str(error))
            return problem(400, f"the multipart body cannot be read ({reason}): {HOW}")
        except PartRefused as refused:
            return problem(refused.status, str(refused))
        except Exception as error:
            log.exception("scoring a part failed")
            return problem(500, f"scoring failed ({type(error).__name__}: {error}); the "
                           "station goes on: check its log")
        finally:
            if form is not None:
                await form.close()
            shutil.rmtree(folder, ignore_errors=True)
        return JSONResponse(answer(scored))

    return BodyLimit(app, max_bytes)


def answer(scored: ScoredPart) -> dict:
    """The JSON answer of ``POST /score``."""
    summary = scored.summary
    return {
        "name": scored.name,
        "score": scored.score,
        "score_rescored": scored.score_rescored,
        "flagged": scored.flagged,
        "flag_threshold": summary["flag_threshold"],
        "flag_note": summary["flag_note"],
        "pixel_threshold": summary["pixel_threshold"],
        "bank": summary["bank"],
        "pool": summary["pool"],
        "out": summary["out"],
        "outputs": summary["outputs"],
        "random_weights": summary["random_weights"],
        "warning": RANDOM_WEIGHTS_WARNING if summary["random_weights"] else None,
        "seconds": summary["seconds"],
        "timings": summary["timings"],
    }


async def save_part(form: FormData, station: InspectionStation, folder: str) -> PartFiles:
    """The part's files of a request, checked and saved below ``folder``.

    Raises:
        PartRefused: what is wrong with the request, and how to send it.
    """
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise PartRefused(400, f"unknown field(s) {unknown}: {HOW}")
    for field in FIELDS:
        if len(form.getlist(field)) > 1:
            raise PartRefused(400, f"the field {field} is given more than once: send one part")
    config = station.config
    image, xyz = form.get("image"), form.get("xyz")
    if config.uses_2d and image is None:
        raise PartRefused(422, f"the field image is missing: line {station.request.line!r} is "
                          f"scored {config.modality}, {HOW}")
    if config.uses_3d and xyz is None:
        raise PartRefused(422, f"the field xyz is missing: line {station.request.line!r} is "
                          f"scored {config.modality}, {HOW}")
    if not config.uses_2d and image is not None:
        raise PartRefused(400, f"line {station.request.line!r} is scored 3D only: send the "
                          "field xyz alone")
    image_path = await _save(image, "image", IMAGE_SUFFIXES, folder)
    xyz_path = await _save(xyz, "xyz", TIFF_SUFFIXES, folder)
    given = form.get("name")
    if given is not None and not isinstance(given, str):
        raise PartRefused(400, "the field name must be text, not a file")
    first = image if image is not None else xyz
    name = given if given is not None else Path(first.filename or "part").stem
    if not _NAME.match(name) or ".." in name:
        raise PartRefused(400, f"the part name {name!r} is not usable: 1 to 128 letters, digits, "
                          "spaces and . _ / - starting with a letter or digit, no '..'")
    return PartFiles(
        name=name, image=image_path, xyz=xyz_path,
        sent_as=(None if image is None else image.filename, None if xyz is None else xyz.filename),
    )


async def _save(
    upload: UploadFile | str | None, field: str, suffixes: tuple[str, ...], folder: str
) -> str | None:
    """Write one uploaded file below ``folder`` with its own suffix; its path (None: not sent)."""
    if upload is None:
        return None
    if not isinstance(upload, UploadFile):
        raise PartRefused(400, f"the field {field} must be a file: {HOW}")
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in suffixes:
        raise PartRefused(
            415, f"the {field} file {upload.filename!r} is not of a kind the station reads: send "
            f"a file named with one of {', '.join(suffixes)}"
        )
    path = Path(folder) / f"{field}{suffix}"
    size = 0
    with open(path, "wb") as handle:
        while chunk := await upload.read(_CHUNK):
            size += len(chunk)
            handle.write(chunk)
    if size == 0:
        raise PartRefused(400, f"the {field} file {upload.filename!r} is empty: send its bytes")
    return str(path)


def start_station(
    station: Station, bank: BankChoice, changes: NewPartsChanges, run: StationRun
) -> InspectionStation:
    """The station's bank loaded and its backbones built (what ``musc serve`` does first)."""
    return InspectionStation(station, bank, changes, run)


def serve(inspection: InspectionStation, station: Station) -> None:
    """Answer requests until stopped (Ctrl-C or SIGTERM: the request in progress finishes).

    Args:
        inspection: the started station.
        station: where to listen and the request size limit.
    """
    import uvicorn

    facts = inspection.facts()
    print(
        f"musc serve: line {facts['line']!r}, bank {', '.join(facts['bank'])} "
        f"({facts['bank_samples']} samples, {facts['bank_memory_mb']} MiB in memory), "
        f"ready in {facts['startup_seconds']:.1f} s\n"
        f"    POST http://{station.host}:{station.port}/score  (multipart: image, xyz, name)\n"
        f"    GET  http://{station.host}:{station.port}/health\n"
        "    Ctrl-C stops the station",
        flush=True,
    )
    if facts["random_weights"]:
        print(f"musc serve: {RANDOM_WEIGHTS_WARNING}", flush=True)
    if station.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"musc serve: listening on {station.host}, not this machine only: the station has "
            "no authentication, anyone who reaches the port can send parts",
            flush=True,
        )
    app = create_app(inspection, int(station.max_request_mb * 2**20))
    uvicorn.run(app, host=station.host, port=station.port, log_level="info")
