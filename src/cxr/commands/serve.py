"""`cxr serve`: a web page and a JSON API in front of a saved model, on FastAPI and uvicorn.

One `Classifier` owns the model. It loads in the background (`/health/ready` says when), then a single worker
thread runs every prediction, taking whatever images are waiting as one batch: a LiteRT interpreter is not
thread-safe, and batches of a few images run more images/s than one at a time (benchmarks/README.md). Uploads are checked (size before the body
is read, type sniffed from the bytes, pixel count from the header) and decoded by the CLI's decode function in
a thread pool, so the server answers exactly as `cxr predict` does.
"""

import asyncio
import base64
import functools
import io
import ipaddress
import os
import queue
import secrets
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

import numpy as np

from cxr.data.decode import MAX_PIXELS, ImageTooLarge, RefusedImage, UnreadableImage, decode, image_warnings
from cxr.data.dicom import is_dicom
from cxr.errors import UserError, warn
from cxr.bundle.model_card import describe, without_local_paths
from cxr.commands.predict import explained_classes, population_fields

MAX_BATCH = 32
MAX_FILES = 64  # per request
# Images decoded at once, whatever the number of requests (more than the cores would not decode faster): an image
# of MAX_PIXELS takes about 300 MB while it decodes, so this bounds the server's decoding memory
DECODE_SLOTS = min(4, os.cpu_count() or 1)
MAX_EXPLAIN_REQUESTS = 4  # Grad-CAM requests answered or waiting at once; more get 503 with Retry-After
MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png", b"BM": "image/bmp"}
DICOM = "application/dicom"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
API_KEY_VARIABLE = "CXR_API_KEY"
PREDICT_BODY = {  # the request body in /docs: FastAPI can't infer a body the endpoint reads itself
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}},
            "required": ["files"]}},
        **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in [*MAGIC.values(), DICOM]},
    },
}


def sniff(data):
    """The image type that `data` (bytes) is by its content (a DICOM file: 'DICM' after its preamble), or None."""
    if is_dicom(data):
        return DICOM
    return next((kind for magic, kind in MAGIC.items() if data.startswith(magic)), None)


class Classifier:
    """A `SavedModel` behind one worker thread that batches concurrent predictions, and Grad-CAM overlays."""

    def __init__(self, model):
        self.model = model
        self.ready = threading.Event()
        self.error = None
        self._requests = queue.SimpleQueue()
        self._keras_lock = threading.Lock()  # the Keras model loaded once
        # Grad-CAM runs on one thread of its own: one image at a time (more would only share the cores), and not
        # on the request threads, whose many allocator arenas made a server under an explain load keep growing
        self._explainer = ThreadPoolExecutor(1, thread_name_prefix="cxr-gradcam")

    def start(self):
        threading.Thread(target=self._work, name="cxr-model", daemon=True).start()

    def outputs(self, pixels):
        """A Future of (the raw softmax row, the population check's features) for one (size, size, 3) uint8
        image."""
        future = Future()
        self._requests.put((pixels, future))
        return future

    def explain(self, data, pixels, target):
        """A Future of (the uploaded image decoded at 512 px or more, the Grad-CAM map of class index `target` over
        it), both uint8 RGB arrays; `pixels` is the model's input decoded from the same bytes `data`."""
        return self._explainer.submit(self._explain, data, pixels, target)

    def _explain(self, data, pixels, target):
        from cxr.evaluate import gradcam

        with self._keras_lock:
            heatmap = gradcam.heatmaps(self.model.keras_model, pixels[None], [target])[0]
        shown = decode(data, max(self.model.img_size, 512)).pixels  # a sharper copy than the model's input
        return shown, gradcam.overlay(shown, heatmap)

    def _work(self):
        try:
            with self._keras_lock:  # Grad-CAM's Keras model, loaded now rather than by the first explain request
                self.model.keras_model
            predictor = self.model.predictor()  # the LiteRT conversion, made now if not cached
            for batch in (1, MAX_BATCH):  # every interpreter and buffer a batch will use, allocated now
                predictor.predict_on_batch(np.zeros((batch, *predictor.input_shape[1:]), np.float32))
        except Exception as error:  # noqa: BLE001 - the server stays up to say why it isn't ready
            self.error = f"{self.model.path}: the model could not be loaded ({str(error).splitlines()[0][:200]})"
            warn(self.error)
            return
        self.ready.set()
        print(f"cxr: model ready ({self.model.engine})", file=sys.stderr, flush=True)
        while True:
            waiting = [self._requests.get()]
            while len(waiting) < MAX_BATCH:
                try:
                    waiting.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            waiting = [(pixels, future) for pixels, future in waiting if future.set_running_or_notify_cancel()]
            if not waiting:
                continue
            try:
                raw, features = self.model.raw_outputs(np.stack([p for p, _ in waiting]), batch_size=len(waiting))
            except Exception as error:  # noqa: BLE001 - each waiting request answers with the error
                for _, future in waiting:
                    future.set_exception(error)
                continue
            for (_, future), row, taps in zip(waiting, raw, features):
                future.set_result((row, taps))


class UploadLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, from its Content-Length before any of it is read,
    or as soon as a body sent without one passes the limit."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        from fastapi import HTTPException

        megabytes = self.max_bytes / 2 ** 20
        return HTTPException(413, f"the request is larger than the server's {megabytes:g} MB limit (--max-upload-mb); "
                                  "send fewer or smaller images per request")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = self._too_large()
            return await error_response(error.status_code, error.detail, {"Connection": "close"})(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()
            return message

        await self.app(scope, counted_receive, send)


# What every answer carries: no framing by other sites (clickjacking), no MIME sniffing, and scripts, styles and
# images from this server only (the page needs nothing else; Swagger UI's page has one inline script)
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer")]
CSP = b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
DOCS_CSP = CSP + b"; script-src 'self' 'unsafe-inline'"


class HostAndHeaders:
    """ASGI middleware: 400 for a Host header the server doesn't answer to (DNS rebinding: a web page whose name
    resolves to 127.0.0.1 could otherwise read the API from the user's browser), and SECURITY_HEADERS on every
    answer. `allowed_hosts`: host names (no port), or None for any."""

    def __init__(self, app, allowed_hosts):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host.rpartition("]")[0].lstrip("[") if host.startswith("[") else host.partition(":")[0]
        if self.allowed is not None and name not in self.allowed:
            return await error_response(400, f"this server does not answer to the host {name!r}; use its address "
                                             "(cxr serve --allowed-host adds a name)")(scope, receive, send)
        csp = DOCS_CSP if scope["path"] == "/docs" else CSP

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS,
                                      (b"content-security-policy", csp)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def allowed_hosts(host, names=()):
    """The Host names a server bound to `host` answers to: its loopback names on loopback (plus `names`); `names`
    alone when given elsewhere; None (any) when serving beyond loopback without names."""
    if is_loopback(host):
        return ["localhost", "127.0.0.1", "::1", *names]
    return [host, *names] if names else None


ERROR_MEANINGS = {
    400: "an image that can't be decoded (the detail names it)",
    401: "a missing or wrong API key",
    413: "a request over --max-upload-mb, or an image over the pixel limit (a decompression bomb)",
    415: "a file that is not a JPEG, PNG, BMP or DICOM image (judged by its bytes)",
    422: "bad parameters, no image in the request, or a DICOM the model may not classify",
    503: "the model is still loading, or too many Grad-CAM requests are being answered (see Retry-After)",
}


def errors(*statuses):
    """The OpenAPI `responses` of an endpoint that can answer these error statuses, in `error_response`'s shape
    (FastAPI would otherwise document its own validation-error shape for 422, which this API never sends)."""
    return {status: {"model": _error_model(), "description": ERROR_MEANINGS[status]} for status in statuses}


@functools.cache
def _error_model():
    from pydantic import BaseModel

    class Error(BaseModel):
        error: str  # the status in words: "payload_too_large"
        detail: str  # what went wrong and what to do

    return Error


def error_response(status, detail, headers=None):
    """The API's one error shape: {"error": "payload_too_large", "detail": "what went wrong and what to do"}."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": error_name(status), "detail": detail}, status_code=status, headers=headers)


def error_name(status):
    """413 -> 'payload_too_large': the "error" of the API's error shape."""
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


def create_app(model, api_key=None, max_upload_bytes=20 * 2 ** 20, max_pixels=MAX_PIXELS,
               hosts=("localhost", "127.0.0.1", "::1"), log=None):
    """The ASGI app for a loaded `SavedModel`; the model's predictor loads in the background at startup. `log`: a
    `monitor.log.PredictionLog` that gets a row per answer."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    import cxr

    classifier = Classifier(model)
    card = without_local_paths(describe(model))  # a client needs no paths of this server
    # Grad-CAM runs one at a time on the Keras model: requests past this many get 503 instead of a thread each
    explaining = {"requests": 0}
    # Uploads decode on threads of their own, a few at once: on the request threads, each large image left memory
    # behind in another thread's allocator arena, and a server under a load of large images kept growing
    decoder = ThreadPoolExecutor(DECODE_SLOTS, thread_name_prefix="cxr-decode")

    @asynccontextmanager
    async def lifespan(app):
        classifier.start()
        yield

    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN; cxr serves its copy (static/swagger/), so the
    # API docs work offline, as the page does
    app = FastAPI(title="cxr", version=cxr.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Chest X-ray classification with a model trained by cxr. Decision support only: "
                              "not a substitute for the judgement of a radiologist or clinician.")
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    app.add_middleware(HostAndHeaders, allowed_hosts=hosts)
    app.mount("/static", StaticFiles(packages=[("cxr", "static")]), name="static")

    @app.get("/docs", include_in_schema=False)
    async def api_docs():
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url=app.openapi_url, title="cxr API",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon-32x32.png")
    bearer = HTTPBearer(auto_error=False, description=f"the server's --api-key (or ${API_KEY_VARIABLE})")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        return error_response(error.status_code, error.detail, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request, error):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return error_response(422, problems)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, error):
        # the client closed the connection before sending all it announced (a body shorter than its
        # Content-Length): nobody is left to read an answer
        warn(f"{request.method} {request.url.path}: the client disconnected before sending the whole request")
        return error_response(400, "the request body ended before its Content-Length; send the whole file")

    @app.exception_handler(Exception)
    async def server_error(request, error):
        first_line = (str(error).splitlines() or [""])[0][:200]
        warn(f"{request.method} {request.url.path} failed: {type(error).__name__}: {first_line}")
        return error_response(500, "the server failed on this request; its log says why")

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    def require_ready():
        if not classifier.ready.is_set():
            raise HTTPException(503, classifier.error or "the model is still loading; retry when /health/ready "
                                                         "answers 200", headers={"Retry-After": "5"})

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("cxr").joinpath("static/index.html").read_text(encoding="utf-8")

    metrics = ServeMetrics(model.class_names, log)

    @app.middleware("http")
    async def count_requests(request, call_next):
        began = time.perf_counter()
        response = await call_next(request)
        if request.url.path == "/v1/predict":
            metrics.requests.labels(str(response.status_code)).inc()
            metrics.latency.observe(time.perf_counter() - began)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        """Prometheus' text format: requests and images by status, latency, calls per class, images flagged,
        the prediction log's queue and failures. Counts only: no image, name or answer."""
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The health checks run on the event loop itself, not in the thread pool that decoding and Grad-CAM keep busy:
    # they answer at once under any load
    @app.get("/health/live", tags=["health"])
    async def live():
        """The process answers."""
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses=errors(503))
    async def ready():
        """The model is loaded (and converted to LiteRT where that runs it): predictions will be answered."""
        require_ready()
        return {"status": "ready", "engine": model.engine}

    # Without a key the API is open, and its spec says so: a bearer scheme is declared only where one is asked for
    guarded = [Depends(require_key)] if api_key is not None else []
    auth_errors = (401,) if api_key is not None else ()

    @app.get("/v1/model", tags=["model"], dependencies=guarded, responses=errors(*auth_errors))
    def model_card():
        """Classes, input, operating point and where it was fitted, training data and test metrics with CIs,
        versions, and the model file's SHA-256."""
        return card | {"engine": model.engine}

    @app.post("/v1/predict", tags=["model"], dependencies=guarded,
              responses=errors(400, *auth_errors, 413, 415, 422, 503),
              openapi_extra={"requestBody": PREDICT_BODY})
    async def predict(request: Request, explain: bool = False):
        """Label and calibrated probabilities for each image (JPEG, PNG, BMP or DICOM): multipart files (any
        field name, `files` in the examples) or one image as the body with its content type. `explain=true` adds
        each image's Grad-CAM overlay as a PNG data URI, and for DICOM the image as cxr rendered it (`image`)."""
        require_ready()
        if explain and explaining["requests"] >= MAX_EXPLAIN_REQUESTS:
            raise HTTPException(503, f"busy: {MAX_EXPLAIN_REQUESTS} Grad-CAM requests are being answered; retry "
                                     "shortly, or ask without explain=true", headers={"Retry-After": "2"})
        explaining["requests"] += explain
        try:
            return await answer(request, explain)
        finally:
            explaining["requests"] -= explain

    async def answer(request, explain):
        """Every image's answer, in the order sent; an image that can't be used gets its own status and detail
        beside the others' predictions, and a request none of whose images can be used gets the first one's
        error status."""
        began = time.perf_counter()
        uploads, image_ids = await read_uploads(request)
        attempts = await asyncio.gather(*(asyncio.wrap_future(decoder.submit(decode_upload, name, data))
                                          for name, data in uploads), return_exceptions=True)
        failures = [a for a in attempts if isinstance(a, BaseException)]
        for failure in failures:
            metrics.images.labels(str(getattr(failure, "status_code", 500))).inc()
        if len(failures) == len(attempts):
            raise failures[0]
        for failure in failures:
            if not isinstance(failure, HTTPException):
                raise failure
        usable = [(k, upload, a) for k, (upload, a) in enumerate(zip(uploads, attempts))
                  if not isinstance(a, BaseException)]
        outputs = await asyncio.gather(*(asyncio.wrap_future(classifier.outputs(d.pixels)) for _, _, (d, _) in usable))
        probabilities, labels = model.calibrate(np.stack([raw for raw, _ in outputs]))
        check = model.check_population(np.stack([taps for _, taps in outputs]))
        answered = {}
        for k, ((sent, (name, data), (image, warnings)), p, label) in enumerate(zip(usable, probabilities, labels)):
            record = prediction_record(name, p, label, warnings) | population_fields(check, k)
            if explain:
                target = explained_classes(model, p, label)[0]
                shown, overlay = await asyncio.wrap_future(classifier.explain(data, image.pixels, target))
                record["overlay"] = png_data_uri(overlay)
                record["overlay_class"] = model.class_names[target]
                if sniff(data) == DICOM:  # browsers can't show DICOM: the page shows it as cxr rendered it
                    record["image"] = png_data_uri(shown)
            answered[sent] = record
        metrics.count_answers(model, labels, check)
        if log is not None:
            record_answers(usable, probabilities, labels, check, image_ids, time.perf_counter() - began)
        predictions = [answered[k] if k in answered else
                       {"filename": name, "status": a.status_code, "error": error_name(a.status_code), "detail": a.detail}
                       for k, ((name, _), a) in enumerate(zip(uploads, attempts))]
        return {"model_sha256": model.sha256, "predictions": predictions}

    def record_answers(usable, probabilities, labels, check, image_ids, seconds):
        """A prediction log row per answered image, keyed by the image_id the client sent with it, else by a
        DICOM's SOP Instance UID, else by its pixels."""
        from cxr.monitor.log import answer_row, header_fields

        for k, ((sent, (_, data), (image, warnings)), p, label) in enumerate(zip(usable, probabilities, labels)):
            image_id = image_ids[sent] if sent < len(image_ids) else None
            fields = header_fields(data, also={"uid": "SOPInstanceUID"})  # {} for a file that isn't DICOM
            uid = fields.pop("uid", None)
            key = (log.key("id", image_id) if image_id else log.key("uid", uid) if uid else
                   log.key("pixels", image.pixels.tobytes()))
            log.record(answer_row(model, p, label, population_fields(check, k), image) | fields
                       | {"image_key": key, "warnings": warnings, "latency_ms": 1000 * seconds / len(usable)})

    async def read_uploads(request):
        """([(name, bytes)], [the image_id form fields, in order]) of a request."""
        image_ids = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES) as form:
                files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
                uploads = [(f.filename or f"file {k + 1}", await f.read()) for k, f in enumerate(files)]
                image_ids = [str(v) for k, v in form.multi_items() if k == "image_id" and not isinstance(v, UploadFile)]
        else:
            body = await request.body()
            uploads = [("the request body", body)] if body else []
        if not uploads:
            raise HTTPException(422, "no image in the request: send multipart files (field 'files') or one image "
                                     "as the request body with its content type")
        return uploads, image_ids

    def decode_upload(name, data):
        if sniff(data) is None:
            raise HTTPException(415, f"{name}: not a JPEG, PNG, BMP or DICOM image (judged by its bytes, not its "
                                     "name or content type)")
        try:
            image = decode(data, model.img_size, max_pixels, name=name)
        except ImageTooLarge as error:
            raise HTTPException(413, f"{error}; downscale it first") from None
        except RefusedImage as error:
            raise HTTPException(422, str(error)) from None
        except UnreadableImage as error:
            raise HTTPException(400, f"{error}: the file is damaged or truncated; send the original image") from None
        return image, image_warnings(image, model.img_size)

    def prediction_record(name, p, label, warnings):
        point, task = model.operating_point, model.task
        record = {"filename": name, "label": task.label_text(label, p),
                  "probabilities": {c: float(v) for c, v in zip(model.class_names, p)},
                  "decision_rule": card["decision_rule"], "warnings": warnings, "model_sha256": model.sha256}
        if not task.multi_label:
            return record | {"positive_class": point["positive_class"], "threshold": point["threshold"]}
        thresholds, called = task.thresholds(point), task.called_mask(label)
        return record | {"positive_findings": task.called(label, p),
                         "findings": [{"name": model.class_names[k], "probability": float(p[k]),
                                       "threshold": thresholds[k], "positive": bool(called[k])}
                                      for k in np.argsort(-p, kind="stable")]}

    return app


def png_data_uri(pixels):
    """A uint8 RGB array as a `data:image/png;base64,...` URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def is_loopback(host):
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, class_names, log=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("cxr_requests", "POST /v1/predict requests by HTTP status", ["status"],
                                registry=registry)
        self.images = Counter("cxr_images", "images by status (200: answered; else why not)", ["status"],
                              registry=registry)
        self.latency = Histogram("cxr_request_seconds", "time to answer a POST /v1/predict", registry=registry,
                                 buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.calls = Counter("cxr_calls", "images called each class or finding", ["name"], registry=registry)
        self.flagged = Counter("cxr_images_flagged", "images the population check flagged as unlike the training "
                                                     "images", registry=registry)
        for name in class_names:
            self.calls.labels(name)
        self.images.labels("200")
        if log is not None:
            Gauge("cxr_monitor_queue", "answers waiting for the prediction log's writer",
                  registry=registry).set_function(lambda: log.waiting)
            Gauge("cxr_monitor_rows_failed", "prediction log rows the database refused or the full queue dropped",
                  registry=registry).set_function(lambda: log.failed + log.dropped)

    def count_answers(self, model, labels, check):
        """Count a request's answered images, their calls and flags."""
        self.images.labels("200").inc(len(labels))
        for label in labels:
            for name in model.task.called(label):
                self.calls.labels(name).inc()
        if check is not None:
            self.flagged.inc(check.flagged)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = None
    max_upload_mb: float = 20
    precision: str = "auto"
    hosts: tuple = ()  # --allowed-host names
    monitor_db: str = None  # the prediction log (`cxr.monitor.log`) every answer is recorded in


def serve(model_path, options=ServeOptions()):
    """Run the server until interrupted. UserError for an unusable model or a port that can't be bound."""
    import uvicorn

    from cxr.bundle.saved_model import SavedModel

    host, port, api_key = options.host, options.port, options.api_key
    model = SavedModel.load(model_path, options.precision)
    if not is_loopback(host):
        warn(f"serving on {host}: anyone who can reach this machine on port {port} can use the model"
             + ("" if api_key else f"; set --api-key (or ${API_KEY_VARIABLE}) to require a key"))
    try:  # a clear message now for a port that is taken; uvicorn binds it again itself (its own socket setup
        # keeps TCP_NODELAY on the connections: a socket handed over to it costs each keep-alive request 40 ms)
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or --host") from None
    answered = allowed_hosts(host, options.hosts)
    if answered is None:
        warn(f"serving on {host} without --allowed-host: any Host header is answered; name the server's host names "
             "with --allowed-host to refuse requests a web page forwards through DNS rebinding")
    log = None
    if options.monitor_db is not None:
        from cxr.monitor.log import PredictionLog

        log = PredictionLog(options.monitor_db, "serve")
    app = create_app(model, api_key, int(options.max_upload_mb * 2 ** 20), hosts=answered, log=log)
    print(f"cxr: serving {model_path} at http://{host}:{port}/ (API docs at /docs); loading the model",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        if log is not None:
            log.close()
