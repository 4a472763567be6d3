"""The screening station: a local web app and JSON API over a trained run.

Two photos in (a left and a right, either may be missing; JPEG, PNG or a camera's DICOM), the
run's decisions out, by the same path as ``predict.py`` (:class:`..inference.predict.Predictor`:
crop, views, both models, ensemble, calibration). One worker thread owns the models and takes
the queued requests in batches; a full queue answers 503 at once, so memory stays bounded by
the queue and the upload limit. Uploads live in a private temporary folder for the length of
one request. Nothing about a patient is logged unless ``log_patients``.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import queue
import re
import resource
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..data.dicom import check_laterality
from ..errors import FundusError, ImageError
from ..inference.bundle import model_card_path
from ..inference.explain import overlay
from ..inference.predict import PatientPhotos, card_of, retake_of, worklist_row
from ..inference.referral import refer
from ..inference.report import markdown_html, prediction_context, prediction_pdf, render
from ..labels import LABEL_NAMES, LABELS

log = logging.getLogger("fundus_ensemble.serve")
DEFAULT_MAX_UPLOAD_MB = 40.0  # a request, both photos together: a 24-megapixel camera DICOM is about 70 MB raw
DEFAULT_QUEUE = 16
DEFAULT_BATCH = 8
AID = "A screening aid, not a diagnosis."
LOGIN_LIMIT = 4096  # bytes of a token form
SESSION_COOKIE = "fundus_session"
MODEL_CARD_ROUTE = "/model-card"
PUBLIC_CARD_KEYS = ("backbone", "input_size", "weights_init", "train_patients", "val_patients", "best_val")


class Busy(Exception):
    """The queue is full: the request is refused (503), not kept waiting without bound."""


class Worker:
    """One thread that owns the predictor and answers queued requests, several at a time."""

    def __init__(self, predictor, queue_size: int = DEFAULT_QUEUE, batch_size: int = DEFAULT_BATCH):
        self.predictor, self.batch_size = predictor, batch_size
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.answered = 0
        threading.Thread(target=self._run, name="fundus-worker", daemon=True).start()

    def submit(self, patient: PatientPhotos) -> Future:
        future: Future = Future()
        try:
            self.jobs.put_nowait((patient, future))
        except queue.Full:
            raise Busy from None
        return future

    def _run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                shown: dict = {}
                results, _, _ = self.predictor.predict_chunk([p for p, _ in batch], collect=shown)
                for (patient, future), result in zip(batch, results):
                    future.set_result((result, shown.get(patient.patient_id)))
            except Exception as exc:  # one bad batch must not end the worker
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            self.answered += len(batch)


def _png_b64(bgr) -> str:
    from ..data.imaging import encode_png

    return base64.b64encode(encode_png(bgr)).decode("ascii")


def answered_card(predictor, patient_id: str, result: tuple) -> tuple[dict, dict]:
    """The page's card of one answered request and its outcome; ImageError when no photo was usable."""
    (_, outcome, note), shown = result
    if outcome is None:  # no photo could be used: say what to do, with why
        raise ImageError(refer(None, retake_of(note)).text)
    return card_of(PatientPhotos(patient_id, None, None), outcome, note, predictor.thresholds, shown), outcome


def answer_json(predictor, patient_id: str, result: tuple, heatmaps: bool) -> dict:
    """The API's answer for one patient: per class the probability, threshold and decision."""
    card, outcome = answered_card(predictor, patient_id, result)
    one_eye = np.array([outcome.get("answered_from", "both eyes") != "both eyes"])
    calibrated = predictor.calibrated(outcome["ensemble"][None], one_eye)[0]
    classes = [
        {
            "class": c,
            "name": LABEL_NAMES[c],
            "probability": p,
            "threshold": t,
            "decision": bool(d),
            "calibrated_probability": float(q),
        }
        for c, p, t, d, q in zip(LABELS, card["probability"], card["threshold"], card["decision"], calibrated)
    ]
    body = {
        "patient_id": patient_id,
        "referral": card["referral"].as_dict(),
        "worklist": worklist_row(patient_id, outcome, card["note"], predictor.thresholds),
        "side_check": card.get("side_check"),
        "classes": classes,
        "eyes": sorted({e for _, e in outcome["eyes"]}),
        "answered_from": card["answered_from"],
        "photo_quality": card["photo_quality"],
        "note": card["note"],
        "thresholds": predictor.source,
        "model": _model_summary(predictor),
        "disclaimer": AID,
        "warning": predictor.fitness_warning,
    }
    if heatmaps:
        body["heatmaps"] = [
            {"eye": eye, "class": c, "overlay_png": _png_b64(overlay(card["eyes"][eye], heat))}
            for (eye, c), heat in card["heatmaps"].items()
        ]
    return body


def public_provenance(provenance: dict) -> dict:
    """What a client may see of the model: no server paths (the run folder, the training manifest)."""
    return {
        "warning": provenance.get("warning"),
        "calibrated": provenance["calibrated"],
        "models": {v: {k: card.get(k) for k in PUBLIC_CARD_KEYS} for v, card in provenance["models"].items()},
        "model_card_url": MODEL_CARD_ROUTE if provenance.get("model_card") else None,
    }


def _model_summary(predictor) -> dict:
    prov = public_provenance(predictor.provenance)
    return {"calibrated": prov["calibrated"], "views": prov["models"]}


def bearer_token(header: str) -> str | None:
    """The credentials of an ``Authorization: Bearer ...`` header (the scheme in any case, RFC 7235)."""
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class _Gate:
    """Pure ASGI, in front of the app: every POST is refused before its body is read unless it
    carries the token (when the station has one; as a bearer header, or the page's session
    cookie) and a Content-Length within the limit, without a Transfer-Encoding beside it; then the
    body's bytes are counted as they arrive, and past the limit (or past what Content-Length
    said) the request ends with 413, whatever the headers said."""

    def __init__(self, app, limit: int, token: str | None, session: str | None, refuse):
        self.app, self.limit, self.token, self.session, self.refuse = app, limit, token, session, refuse

    def _authorised(self, headers: dict[str, str]) -> bool:
        given = bearer_token(headers.get("authorization", ""))
        if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
            return True
        cookies = [c.strip().partition("=") for c in headers.get("cookie", "").split(";")]
        session = next((value for name, _, value in cookies if name == SESSION_COOKIE), "")
        return bool(session) and secrets.compare_digest(session.encode(), self.session.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        length = headers.get("content-length", "").strip()
        limit = LOGIN_LIMIT if path == "/login" else self.limit
        if "transfer-encoding" in headers:
            return await self.refuse(
                scope, send, 400 if length else 411, "a request body needs a Content-Length, not a Transfer-Encoding"
            )
        if not length.isdigit():
            return await self.refuse(scope, send, 411, "a request needs its Content-Length")
        if self.token is not None and path != "/login" and not self._authorised(headers):
            return await self.refuse(scope, send, 401, "a valid token is needed (Authorization: Bearer TOKEN)")
        if int(length) > limit:
            return await self.refuse(
                scope, send, 413, f"upload too large ({int(length) / 1e6:.1f} MB; the limit is {limit / 1e6:g} MB)"
            )
        declared, received, over, started = int(length), 0, False, False

        async def counted():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > min(limit, declared):
                    over = True
                    return {"type": "http.disconnect"}  # the app stops reading; the answer below replaces its own
            return message

        async def guarded(message):
            nonlocal started
            if over:
                return
            started = True
            await send(message)

        await self.app(scope, counted, guarded)
        if over and not started:
            await self.refuse(
                scope, send, 413, f"the body is larger than its Content-Length or the limit of {limit / 1e6:g} MB"
            )


def create_app(
    predictor,
    token: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    queue_size: int = DEFAULT_QUEUE,
    batch_size: int = DEFAULT_BATCH,
    log_patients: bool = False,
):
    """The FastAPI app over ``predictor`` (a :class:`Predictor` with Grad-CAM readied).

    ``token``: every prediction needs it (``Authorization: Bearer``, or the page's token field).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    worker = Worker(predictor, queue_size, batch_size)
    limit = int(max_upload_mb * 1e6)
    # the page's session: a cookie derived from the token, so the token itself is never stored in a browser
    session = (
        hmac.new(token.encode(), b"fundus-ensemble station session", hashlib.sha256).hexdigest() if token else None
    )
    app = FastAPI(
        title="fundus-ensemble screening station",
        version="1",
        description=f"Eight ODIR classes from a patient's fundus photos. {AID}",
        # Swagger's and ReDoc's pages load their scripts from a CDN: blank on a clinic's offline machine
        docs_url=None,
        redoc_url=None,
    )
    app.state.worker = worker
    shown = public_provenance(predictor.provenance)

    async def refuse(scope, send, status: int, reason: str) -> None:
        """The gate's answer: the page again with the reason for the page, else ``{"detail": one line}``."""
        if scope["path"] in ("/", "/login"):
            body, kind = (
                _page(predictor, token is not None, error=reason, logged_in=False).encode(),
                b"text/html; charset=utf-8",
            )
        else:
            body, kind = json.dumps({"detail": reason}).encode(), b"application/json"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    app.add_middleware(_Gate, limit=limit, token=token, session=session, refuse=refuse)

    @app.exception_handler(RequestValidationError)
    async def one_line_validation(request: Request, exc: RequestValidationError):
        problems = [
            f"{' '.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        ]
        return JSONResponse({"detail": _one_line("; ".join(problems) or "invalid request")}, status_code=422)

    @app.get("/health")
    def health() -> dict:
        """For a load balancer: the server is up and its model loaded."""
        return {
            "status": "ok",
            "queued": worker.jobs.qsize(),
            "queue_size": queue_size,
            "answered": worker.answered,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }

    async def read_form(request: Request, **limits):
        """The request's form, or a one-line 4xx: a malformed body is the client's fault."""
        try:
            return await request.form(**limits)
        except HTTPException as exc:  # starlette's answer to a malformed multipart or urlencoded body
            raise _Refused(400, f"malformed form: {exc.detail}") from None
        except ClientDisconnect:  # the gate ended an oversized body; its 413 replaces this answer
            raise _Refused(413, "the body was cut off") from None
        except Exception as exc:  # the form parser's own errors on a garbled body
            raise _Refused(400, f"malformed form ({type(exc).__name__})") from None

    async def predict_upload(request: Request) -> tuple[str, tuple]:
        # the gate has checked the token and the size before any of this body was read
        form = await read_form(request, max_files=3, max_fields=10, max_part_size=4096)
        unknown = sorted(set(form.keys()) - {"patient_id", "left", "right", "token"})
        if unknown:
            raise _Refused(
                422, f"unknown form field(s) {', '.join(map(repr, unknown[:5]))}; expected patient_id, left, right"
            )
        patient_id = form.get("patient_id") or "patient"
        if not isinstance(patient_id, str):
            raise _Refused(422, "patient_id was sent as a file; send it as a text field")
        patient_id = patient_id.strip()[:128] or "patient"
        folder = Path(tempfile.mkdtemp(prefix="fundus-upload-"))  # mode 0700: this user's alone
        try:
            photos: dict[str, Path] = {}
            for eye in ("left", "right"):
                upload = form.get(eye)
                if isinstance(upload, str) and upload:
                    raise _Refused(422, f"the {eye} photo was sent as a text field; send it as a file")
                if not isinstance(upload, UploadFile) or not upload.filename:
                    continue
                data = await upload.read()
                if not data:
                    continue
                path = folder / eye
                path.write_bytes(data)
                try:
                    check_laterality(path, eye, predictor.max_pixels)
                except ImageError as exc:
                    raise _Refused(422, f"{eye} photo: {exc}") from None
                photos[eye] = path
            if not photos:
                raise _Refused(422, "no photo: upload a left or a right photo (or both)")
            if log_patients:
                log.info("predicting %s (%s)", patient_id, ", ".join(sorted(photos)))
            try:
                future = worker.submit(PatientPhotos(patient_id, photos.get("left"), photos.get("right")))
            except Busy:
                raise _Refused(503, "busy: the queue is full, try again shortly") from None
            result = await asyncio.wrap_future(future)
            return patient_id, result
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @app.post("/predict")
    async def predict_api(request: Request, heatmaps: bool = False):
        """Multipart form: ``left`` and/or ``right`` photo files, optional ``patient_id``.

        Answers per class the ensemble's probability, the threshold, the decision and the
        calibrated probability; ``?heatmaps=true`` adds Grad-CAM overlays (PNG, base64) of the
        classes decided positive. Errors: 4xx with ``{"detail": one line}``.
        """
        started = time.perf_counter()
        try:
            patient_id, result = await predict_upload(request)
            body = answer_json(predictor, patient_id, result, heatmaps)
        except _Refused as exc:
            return JSONResponse(
                {"detail": exc.reason},
                status_code=exc.status,
                headers={"Retry-After": "1"} if exc.status == 503 else None,
            )
        except FundusError as exc:
            return JSONResponse({"detail": _one_line(exc)}, status_code=422)
        except Exception as exc:  # never a stack trace to the caller; the type alone in the log
            log.error("prediction failed: %s", type(exc).__name__)
            return JSONResponse({"detail": "internal error while predicting"}, status_code=500)
        body["seconds"] = round(time.perf_counter() - started, 3)
        return body

    def logged_in(request: Request) -> bool:
        return token is None or secrets.compare_digest(
            request.cookies.get(SESSION_COOKIE, "").encode(), session.encode()
        )

    def card_text() -> str | None:
        path = model_card_path(predictor.run_dir)
        return path.read_text(encoding="utf-8") if path is not None else None

    @app.get(MODEL_CARD_ROUTE, response_class=HTMLResponse)
    def model_card():
        """The model card of the model answering, as a page: what it is for and how far to trust it."""
        text = card_text()
        if text is None:
            return PlainTextResponse("this model has no model card (only a bundled model carries one)", 404)
        return HTMLResponse(
            render("model_card.html", "Model card", markdown_url=f"{MODEL_CARD_ROUTE}.md", card=markdown_html(text))
        )

    @app.get(f"{MODEL_CARD_ROUTE}.md", response_class=PlainTextResponse)
    def model_card_markdown():
        """The model card's Markdown, as the model folder keeps it."""
        text = card_text()
        if text is None:
            return PlainTextResponse("this model has no model card (only a bundled model carries one)", 404)
        return PlainTextResponse(text)

    @app.get("/", response_class=HTMLResponse)
    def form_page(request: Request):
        return HTMLResponse(_page(predictor, token is not None, logged_in=logged_in(request)))

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request):
        """The page's token, exchanged for a session cookie that later uploads carry in their headers."""
        try:
            given = (await read_form(request, max_fields=2, max_part_size=LOGIN_LIMIT)).get("token")
        except _Refused as exc:
            return HTMLResponse(_page(predictor, True, error=exc.reason, logged_in=False), status_code=exc.status)
        if token is None:
            return RedirectResponse("/", status_code=303)
        if not isinstance(given, str) or not secrets.compare_digest(given.encode(), token.encode()):
            return HTMLResponse(_page(predictor, True, error="wrong token", logged_in=False), status_code=401)
        answer = RedirectResponse("/", status_code=303)
        answer.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict")
        return answer

    @app.post("/", response_class=HTMLResponse)
    async def form_answer(request: Request):
        needs = token is not None
        try:
            card, _ = answered_card(predictor, *await predict_upload(request))
        except _Refused as exc:
            return HTMLResponse(_page(predictor, needs, error=exc.reason), status_code=exc.status)
        except FundusError as exc:
            return HTMLResponse(_page(predictor, needs, error=_one_line(exc)), status_code=422)
        except Exception as exc:
            log.error("prediction failed: %s", type(exc).__name__)
            return HTMLResponse(_page(predictor, needs, error="internal error while predicting"), status_code=500)
        summary = {"patients": 1, "predicted": 1, "rejected": 0}
        # the record as a PDF made here (as predict.py makes report.pdf), carried in the page
        # itself: nothing is kept on the station once the answer has gone; the page and its PDF
        # share one context, so that each picture is resized and encoded once
        result = prediction_context([card], predictor.source, summary, shown, thumb=224)
        pdf = await run_in_threadpool(prediction_pdf, result)
        return HTMLResponse(
            _page(
                predictor,
                needs,
                result=result,
                pdf={
                    "name": f"record-{re.sub(r'[^A-Za-z0-9_.-]', '_', card['patient_id'])[:64]}.pdf",
                    "uri": "data:application/pdf;base64," + base64.b64encode(pdf).decode("ascii"),
                },
            )
        )

    return app


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _page(
    predictor,
    needs_token: bool,
    result: dict | None = None,
    error: str | None = None,
    logged_in: bool = True,
    pdf: dict | None = None,
) -> str:
    """The station's page (``station.html``): a warning when the run should not screen, the answer
    first (the referral line, then the eyes and decisions), the form for the next patient, and what
    decided it below. ``result``: :func:`..inference.report.prediction_context` of the answered
    patient; ``pdf``: its record as a PDF (``name``, ``uri``)."""
    shown = result or prediction_context(
        [], predictor.source, {"patients": 0, "predicted": 0, "rejected": 0}, public_provenance(predictor.provenance)
    )
    return render(
        "station.html",
        "fundus-ensemble screening station",
        p=shown,
        aid=AID,
        error=error,
        login=needs_token and not logged_in,
        pdf=pdf,
    )
