"""The web service: a FastAPI app that classifies uploaded X-rays, and the page that uses it.

``POST /predict`` takes a multipart upload of one image (field ``file``: PNG, JPEG or DICOM, decided by its
bytes; optional ``heatmap=true`` as a form field or query parameter) and answers the class, the
probabilities, the model's identity and, when asked, a Grad-CAM overlay as a base64 PNG. A request with two
``file`` parts, or an empty one, is refused (422): one image per request.

The API is described at ``/openapi.json`` and, as a plain page, at ``/docs``, built here from that description:
nothing is fetched from the network at run time (FastAPI's own Swagger UI and ReDoc pages load their scripts
from a CDN, which a hospital network may block and should not be asked to reach), so they are off.

Every answer names what decided the class (``decision``: the model's operating point; with a threshold
rule the class need not be the most probable one) and the model (``model``: its file's sha256, backend,
precision and, for an int8 model, the record of its check against fp32).

Safety: the body is read into memory within ``max_upload_bytes`` (never spooled to disk, see
:mod:`.uploads`); images are decoded by content with the data layer's header-first check, which refuses
an image over ``max_pixels`` before decoding a pixel (``max_pixels`` may not exceed the decoder's own
:data:`~covid_cxr.data.images.MAX_PIXELS`); every client mistake is a 4xx JSON ``{"detail": ...}``, and
so is any failure to decode one upload (a 422 with the reason; the traceback goes to the log). Any
other unexpected failure is a bare 500 JSON without a trace. A client that hangs up mid-upload (a tab
closed) is no error: one INFO line, no traceback. Nothing from the upload (file name, DICOM
header) is logged, except an unexpected decoder failure's traceback.

Concurrency: decoding runs in worker threads, at most ``decode_workers`` at once (bounding
memory); the network is driven by one worker task that takes the uploads waiting in its queue,
up to ``max_batch`` at a time, and runs them as one batch in a thread through the same
predict-and-decide step as ``predict`` (:class:`~covid_cxr.inference.pipeline.Classifier`).
Concurrent uploads thus queue and share batches instead of fighting over the cores. The queue and
its worker belong to one lifespan (one event loop): each start makes new ones, so an app can be
started again (a second test client, an embedding app restarting it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import html
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from markdown_it import MarkdownIt
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from covid_cxr import __version__
from covid_cxr.data.images import MAX_PIXELS, decode_radiograph
from covid_cxr.deploy.limits import ServerLimits
from covid_cxr.deploy.saturation import agreement_words
from covid_cxr.deploy.uploads import UploadError, read_multipart
from covid_cxr.errors import ConfigError, ImageDecodeError
from covid_cxr.gradcam import CamResult, GradCam, overlay_png
from covid_cxr.inference.backends import precision_of
from covid_cxr.inference.pipeline import Classifier
from covid_cxr.inference.protocol import Predictor
from covid_cxr.labels import DISPLAY_NAMES
from covid_cxr.runs.model_card import split_front_matter

DISCLAIMER = "Research tool, not a diagnostic device: do not use it to diagnose, treat or triage patients."

log = logging.getLogger(__name__)


Answer = tuple[np.ndarray, int, CamResult | None]  # probabilities (C,), decided class index, heatmap
Job = tuple[np.ndarray, bool, "asyncio.Future[Answer]"]  # image, heatmap wanted, where the answer goes


class InferenceQueue:
    """One worker owns the network: uploads queue, and those waiting together run as one batch.

    The queue and the worker task are made by :meth:`start`, in the event loop that serves (an asyncio queue
    belongs to the loop it is first used in), and dropped by :meth:`stop`, so a second lifespan starts afresh.
    """

    def __init__(self, classifier: Classifier, gradcam: GradCam | None, max_batch: int) -> None:
        self.classifier = classifier
        self.gradcam = gradcam
        self.max_batch = max_batch
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> tuple[asyncio.Queue[Job], asyncio.Task[None]]:
        """A new queue and its worker, in the running event loop."""
        queue: asyncio.Queue[Job] = asyncio.Queue()
        self._queue, self._task = queue, asyncio.create_task(self._run(queue))
        return queue, self._task

    async def stop(self) -> None:
        """End the worker; a worker that died has handed its error to the requests already, so it is not raised."""
        task, self._task, self._queue = self._task, None, None
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))
            if not task.cancelled():
                task.exception()  # retrieved: asyncio would otherwise log it as never retrieved

    async def submit(self, image: np.ndarray, heatmap: bool) -> Answer:
        """Probabilities, decided class and, with ``heatmap``, the Grad-CAM of that class for one model-sized image.

        A worker that has died (or was stopped) raises its error here rather than leaving the request waiting.
        """
        if self._queue is None or self._task is None:
            queue, task = await self.start()  # apps driven without their lifespan (some test clients) start on use
        else:
            queue, task = self._queue, self._task
        if task.done():
            raise _worker_failure(task)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        await queue.put((image, heatmap, future))
        try:
            await asyncio.wait((future, task), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.cancel()  # the client hung up: the worker skips its answer
            raise
        if future.done():
            return future.result()
        future.cancel()
        raise _worker_failure(task)

    def _classify(self, images: list[np.ndarray]) -> list[Answer]:
        return [(probs, decided, None) for probs, decided in self.classifier(np.stack(images)).rows()]

    def _explain(self, image: np.ndarray) -> list[Answer]:
        """The same numbers as without a heatmap, and the map of the decided class."""
        if self.gradcam is None:  # the endpoint refuses heatmap requests first; this only guards the worker
            raise RuntimeError("a heatmap was asked of a server without Grad-CAM")
        ((probs, decided, _),) = self._classify([image])
        return [(probs, decided, self.gradcam(image[None], [decided])[0])]

    async def _run(self, queue: asyncio.Queue[Job]) -> None:
        set_aside: list[Job] = []  # heatmap jobs met while batching
        while True:
            first = set_aside.pop(0) if set_aside else await queue.get()
            jobs = [first]
            if first[1]:  # Grad-CAM needs a backward pass: one image at a time keeps its memory small
                work = functools.partial(self._explain, first[0])
            else:
                while len(jobs) < self.max_batch and not queue.empty():
                    job = queue.get_nowait()
                    (set_aside if job[1] else jobs).append(job)
                work = functools.partial(self._classify, [job[0] for job in jobs])
            try:
                results = await anyio.to_thread.run_sync(work)
            except Exception as exc:  # handed to the requests that caused it; the worker keeps serving
                for *_, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), result in zip(jobs, results):
                if not future.done():  # a client that hung up has cancelled its future
                    future.set_result(result)


def _worker_failure(task: asyncio.Task[None]) -> Exception:
    """The error of an inference worker that is no longer running, to raise in the request that found it so."""
    if task.cancelled():
        return RuntimeError("the inference worker was stopped: the app's lifespan has ended")
    error = task.exception()
    if isinstance(error, Exception):
        return error
    failure = RuntimeError(f"the inference worker ended ({error!r})")
    failure.__cause__ = error
    return failure


def check_limits(limits: ServerLimits) -> None:
    """Refuse limits the decoder cannot honour: it never decodes an image over its own :data:`MAX_PIXELS`."""
    if limits.max_pixels > MAX_PIXELS:
        raise ConfigError(f"--max-pixels {limits.max_pixels} is above the largest image the decoder reads "
                          f"({MAX_PIXELS} pixels, covid_cxr.data.images.MAX_PIXELS); give {MAX_PIXELS} or less")


def model_description(predictor: Predictor, *, network: str, sha256: str) -> dict[str, Any]:
    """What ``/health`` and every prediction report about the model answering."""
    precision, int8 = precision_of(predictor)
    described: dict[str, Any] = {
        "network": network,
        "backend": predictor.backend,
        "precision": precision,
        "classes": list(predictor.classes),
        "image_size": predictor.preprocessing.image_size,
        "scaling": predictor.preprocessing.scaling,
        "resize": predictor.preprocessing.resize,
        "sha256": sha256,
        "version": f"{network}@{sha256[:12]}" if sha256 else network,
        "covid_cxr_version": __version__,
    }
    if int8 is not None:
        check = int8.get("check") or {}
        described["int8"] = {"weight_scheme": int8.get("weight_scheme"), "check_images": check.get("images"),
                             "agreement_pct": check.get("agreement_pct"),
                             "agreement": agreement_words(check) if check.get("agreement_pct") is not None else None,
                             "decision_rule": check.get("decision_rule"),
                             "argmax_agreement_pct": check.get("argmax_agreement_pct")}
    return described


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class MarkdownResponse(PlainTextResponse):
    """Markdown text, so declared in the API description too (``text/markdown``, not ``text/plain``)."""

    media_type = "text/markdown"


def _flag(value: str | None) -> bool:
    if value is None:
        return False
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise UploadError(422, f"heatmap must be true or false; got {value!r}")


_PREDICT_OPENAPI: dict[str, Any] = {
    "description": "One chest X-ray per request, as a multipart/form-data part named `file`. A request with "
    "several `file` parts, or an empty one, is refused (422); send each X-ray in a request of its own.",
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "one chest X-ray: PNG, JPEG or DICOM (decided by content)"},
                        "heatmap": {"type": "boolean", "default": False,
                                    "description": "also return a Grad-CAM overlay (PNG, base64)"},
                    },
                }
            }
        },
    },
    "responses": {
        "400": {"description": "a malformed multipart body (no or a bad boundary, a broken part header)"},
        "413": {"description": "upload or image too large"},
        "415": {"description": "not a multipart/form-data request"},
        "422": {"description": "no, an empty or a second 'file' part, or an unreadable image"},
    },
}


def create_app(
    predictor: Predictor,
    *,
    network: str,
    sha256: str = "",
    gradcam: GradCam | None = None,
    limits: ServerLimits | None = None,
    model_card: str | None = None,
) -> FastAPI:
    """The service around one loaded model; ``gradcam`` (a PyTorch model) enables heatmaps; ``model_card``
    (Markdown) is served at ``/model-card`` and, rendered, at ``/model-card.html`` for the page."""
    limits = limits or ServerLimits()
    check_limits(limits)
    model = model_description(predictor, network=network, sha256=sha256)
    classifier = Classifier(predictor)  # with the model's operating point (argmax when it has none)
    model["operating_point"] = classifier.decision.to_dict()
    decision = classifier.decided_by()
    queue = InferenceQueue(classifier, gradcam, limits.max_batch)
    decode_slots = anyio.CapacityLimiter(limits.decode_workers)
    size = predictor.preprocessing.image_size

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        yield
        await queue.stop()

    app = FastAPI(
        title="covid-cxr",
        version=__version__,
        description=f"Chest X-ray classification ({', '.join(DISPLAY_NAMES[c] for c in predictor.classes)}). "
        + DISCLAIMER,
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: /docs is served below, from this app alone
        redoc_url=None,
    )
    app.state.model = model
    app.state.decision = classifier.decision
    app.state.limits = limits

    @app.exception_handler(UploadError)
    async def _upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)  # a 405's Allow header among them

    @app.exception_handler(ClientDisconnect)
    async def _hung_up(_request: Request, _exc: ClientDisconnect) -> Response:
        log.info("a client hung up before its upload was complete; the request was dropped")
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": exc.errors()}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(500, "internal error while processing the request")  # no trace, no upload content

    @app.get("/health", summary="Liveness and the model being served")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model, "decision": decision, "heatmaps": gradcam is not None,
                "disclaimer": DISCLAIMER,
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels}}

    @app.post("/predict", summary="Classify one chest X-ray", openapi_extra=_PREDICT_OPENAPI)
    async def predict(request: Request) -> dict[str, Any]:
        form = await read_multipart(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
            max_bytes=limits.max_upload_bytes,
        )
        uploads = form.files("file")
        if not uploads:
            raise UploadError(422, "no image: send the X-ray in a multipart field named 'file'")
        if len(uploads) > 1:
            raise UploadError(422, f"one image per request: this one has {len(uploads)} parts named 'file'; send "
                              "each X-ray in a request of its own")
        upload = uploads[0]
        if not upload.data:
            raise UploadError(422, "the upload in the field 'file' is empty (0 bytes); send the X-ray file itself "
                              "(with curl: -F file=@scan.png)")
        heatmap = _flag(request.query_params.get("heatmap")) or _flag(form.text("heatmap"))
        if heatmap and gradcam is None:
            raise UploadError(422, "this server has no PyTorch model for heatmaps (serve a .pt checkpoint)")
        data = bytes(upload.data)
        del form  # the raw upload is not kept longer than decoding needs
        original = await anyio.to_thread.run_sync(_decode, data, limits.max_pixels, limiter=decode_slots)
        del data
        image = classifier.fit(original)
        probs, best, cam = await queue.submit(image, heatmap)
        body: dict[str, Any] = {
            "class": predictor.classes[best],
            "label": DISPLAY_NAMES[predictor.classes[best]],
            "probabilities": {c: round(float(p), 6) for c, p in zip(predictor.classes, probs)},
            "decision": decision,
            "model": model,
            "image": {"width": int(original.shape[1]), "height": int(original.shape[0])},
            "disclaimer": DISCLAIMER,
        }
        if cam is not None:
            png = await anyio.to_thread.run_sync(overlay_png, image, cam.map)
            body["heatmap"] = {
                "class": predictor.classes[cam.target],
                "png_base64": base64.b64encode(png).decode("ascii"),
                "width": size,
                "height": size,
            }
        return body

    @app.get("/model-card", summary="The model card (Markdown, Hugging Face layout)", response_class=MarkdownResponse,
             responses={404: {"description": "the server was started without a model card"}})
    async def card() -> MarkdownResponse:
        if model_card is None:
            raise StarletteHTTPException(404, "this server was started without a model card")
        return MarkdownResponse(model_card)

    @app.get("/model-card.html", include_in_schema=False)
    async def card_html() -> HTMLResponse:
        if model_card is None:
            raise StarletteHTTPException(404, "this server was started without a model card")
        return HTMLResponse(render_card_html(model_card))

    static = resources.files("covid_cxr.deploy") / "static"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_api_html(app.openapi()))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def render_card_html(card: str) -> str:
    """The card's Markdown as an HTML fragment (raw HTML in it is escaped), its YAML header folded away."""
    header, body = split_front_matter(card)
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    meta = card[: len(card) - len(body)].strip().strip("-").strip() if header else ""
    folded = f"<details><summary>Metadata (YAML)</summary><pre>{html.escape(meta)}</pre></details>" if meta else ""
    return md.render(body) + folded


def render_api_html(spec: dict[str, Any]) -> str:
    """The OpenAPI description as one plain HTML page that fetches nothing from the network: each endpoint, its
    summary, the fields of its form and its answers, and where the machine-readable description is."""
    info = spec.get("info", {})
    title = _text(f"{info.get('title', '')} {info.get('version', '')} API")
    where = ('<p>The machine-readable description (OpenAPI 3) is at <a href="/openapi.json">/openapi.json</a>: '
             "load it into any OpenAPI tool or client generator.</p>")
    parts = [f"<h1>{title}</h1>", f"<p>{_text(info.get('description', ''))}</p>", where]
    for path, methods in spec.get("paths", {}).items():
        for method, operation in methods.items():
            parts += _operation_html(method, path, operation)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<link rel="stylesheet" href="/static/style.css"></head><body><main>{"".join(parts)}</main></body></html>')


def _operation_html(method: str, path: str, operation: dict[str, Any]) -> list[str]:
    """One endpoint of :func:`render_api_html`."""
    parts = [f"<h2><code>{_text(method.upper())} {_text(path)}</code></h2>"]
    parts += [f"<p>{_text(operation[key])}</p>" for key in ("summary", "description") if operation.get(key)]
    for mime, content in operation.get("requestBody", {}).get("content", {}).items():
        schema = content.get("schema", {})
        required = set(schema.get("required", []))
        fields = "".join(f"<li><code>{_text(name)}</code> ({_text(field.get('format') or field.get('type'))}"
                         f"{', required' if name in required else ''}): {_text(field.get('description', ''))}</li>"
                         for name, field in schema.get("properties", {}).items())
        parts.append(f"<p>Request body, <code>{_text(mime)}</code>:</p><ul>{fields}</ul>")
    answers = "".join(f"<li><code>{_text(code)}</code>: {_text(answer.get('description', ''))}</li>"
                      for code, answer in operation.get("responses", {}).items())
    return [*parts, f"<p>Answers:</p><ul>{answers}</ul>"]


def _text(value: object) -> str:
    return html.escape(str(value))


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode by content, refusing from the header an image over ``max_pixels`` (a 413, as a bomb is); an
    unreadable upload is a 422 with the reason, whatever the decoder raised (the traceback goes to the log)."""
    try:
        image, _ = decode_radiograph(data, name="upload", max_pixels=max_pixels)
    except ImageDecodeError as exc:
        too_large = "decompression bomb" in exc.reason or "exceeds the limit" in exc.reason
        raise UploadError(413 if too_large else 422, f"cannot use the upload: {exc.reason}") from None
    except Exception as exc:  # a decoder failure nobody foresaw is still this upload's, not the server's
        log.exception("unexpected error while decoding an upload")
        raise UploadError(422, f"cannot use the upload: unexpected error while decoding it ({type(exc).__name__}: "
                          f"{exc}); the file is likely corrupt: send the original file, or convert it to PNG") from None
    return image
