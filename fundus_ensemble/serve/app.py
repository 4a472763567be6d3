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
import html
import logging
import queue
import resource
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from ..data.dicom import is_dicom, read_dicom_header
from ..errors import FundusError, ImageError
from ..inference.explain import overlay
from ..inference.predict import PatientPhotos, Predictor, card_of
from ..inference.report import page, prediction_sections
from ..labels import LABEL_NAMES, LABELS

log = logging.getLogger("fundus_ensemble.serve")
DEFAULT_MAX_UPLOAD_MB = 40.0  # a request, both photos together: a 24-megapixel camera DICOM is about 70 MB raw
DEFAULT_QUEUE = 16
DEFAULT_BATCH = 8
AID = "A screening aid, not a diagnosis."


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
    if outcome is None:
        raise ImageError(note)
    return card_of(PatientPhotos(patient_id, None, None), outcome, note, predictor.thresholds, shown), outcome


def answer_json(predictor, patient_id: str, result: tuple, heatmaps: bool) -> dict:
    """The API's answer for one patient: per class the probability, threshold and decision."""
    card, outcome = answered_card(predictor, patient_id, result)
    calibrated = predictor.calibrated(outcome["ensemble"][None])[0]
    classes = [{"class": c, "name": LABEL_NAMES[c], "probability": p, "threshold": t, "decision": bool(d),
                "calibrated_probability": float(q)}
               for c, p, t, d, q in zip(LABELS, card["probability"], card["threshold"], card["decision"], calibrated)]
    body = {"patient_id": patient_id, "classes": classes, "eyes": sorted({e for _, e in outcome["eyes"]}), "note": card["note"],
            "thresholds": predictor.source, "model": _model_summary(predictor), "disclaimer": AID}
    if heatmaps:
        body["heatmaps"] = [{"eye": eye, "class": c, "overlay_png": _png_b64(overlay(card["eyes"][eye], heat))}
                            for (eye, c), heat in card["heatmaps"].items()]
    return body


def _model_summary(predictor) -> dict:
    prov = predictor.provenance
    return {"run": prov["run"], "calibrated": prov["calibrated"],
            "views": {v: {k: card.get(k) for k in ("backbone", "input_size", "weights_init", "train_patients",
                                                     "data_manifest", "best_val")}
                      for v, card in prov["models"].items()}}


def create_app(predictor, token: str | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               queue_size: int = DEFAULT_QUEUE, batch_size: int = DEFAULT_BATCH, log_patients: bool = False):
    """The FastAPI app over ``predictor`` (a :class:`Predictor` with Grad-CAM readied).

    ``token``: every prediction needs it (``Authorization: Bearer``, or the page's token field).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    worker = Worker(predictor, queue_size, batch_size)
    limit = int(max_upload_mb * 1e6)
    app = FastAPI(title="fundus-ensemble screening station", version="1",
                  description=f"Eight ODIR classes from a patient's fundus photos. {AID}")
    app.state.worker = worker

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and (length is None or not length.isdigit()):
            return JSONResponse({"detail": "a request needs its Content-Length"}, status_code=411)
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"detail": f"upload too large ({int(length) / 1e6:.1f} MB; the limit is "
                                           f"{max_upload_mb:g} MB)"}, status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        """For a load balancer: the server is up and its model loaded."""
        return {"status": "ok", "queued": worker.jobs.qsize(), "queue_size": queue_size, "answered": worker.answered,
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}

    async def predict_upload(request: Request) -> tuple[str, tuple]:
        form = await request.form(max_files=3, max_fields=10)
        if token is not None:
            given = request.headers.get("authorization", "")
            supplied = given[len("Bearer "):] if given.startswith("Bearer ") else str(form.get("token") or "")
            if not secrets.compare_digest(supplied.encode(), token.encode()):
                raise _Refused(401, "a valid token is needed (Authorization: Bearer TOKEN)")
        patient_id = str(form.get("patient_id") or "patient").strip()[:128] or "patient"
        folder = Path(tempfile.mkdtemp(prefix="fundus-upload-"))  # mode 0700: this user's alone
        try:
            photos: dict[str, Path] = {}
            for eye in ("left", "right"):
                upload = form.get(eye)
                if upload is None or isinstance(upload, str) or not upload.filename:
                    continue
                data = await upload.read()
                if not data:
                    continue
                path = folder / eye
                path.write_bytes(data)
                if is_dicom(path):
                    try:
                        said = read_dicom_header(path).laterality
                    except ImageError as exc:
                        raise _Refused(422, f"{eye} photo: {exc}") from None
                    if said is not None and said != eye:
                        raise _Refused(422, f"the {eye} photo is a DICOM of the {said} eye (ImageLaterality); "
                                            "upload it as the other eye")
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
            return JSONResponse({"detail": exc.reason}, status_code=exc.status,
                                headers={"Retry-After": "1"} if exc.status == 503 else None)
        except FundusError as exc:
            return JSONResponse({"detail": _one_line(exc)}, status_code=422)
        except Exception as exc:  # never a stack trace to the caller; the type alone in the log
            log.error("prediction failed: %s", type(exc).__name__)
            return JSONResponse({"detail": "internal error while predicting"}, status_code=500)
        body["seconds"] = round(time.perf_counter() - started, 3)
        return body

    @app.get("/", response_class=HTMLResponse)
    def form_page():
        return HTMLResponse(_page(predictor, token is not None))

    @app.post("/", response_class=HTMLResponse)
    async def form_answer(request: Request):
        try:
            card, _ = answered_card(predictor, *await predict_upload(request))
        except _Refused as exc:
            return HTMLResponse(_page(predictor, token is not None, error=exc.reason), status_code=exc.status)
        except FundusError as exc:
            return HTMLResponse(_page(predictor, token is not None, error=_one_line(exc)), status_code=422)
        except Exception as exc:
            log.error("prediction failed: %s", type(exc).__name__)
            return HTMLResponse(_page(predictor, token is not None, error="internal error while predicting"),
                                status_code=500)
        summary = {"patients": 1, "predicted": 1, "rejected": 0}
        return HTMLResponse(_page(predictor, token is not None,
                                  result=prediction_sections([card], predictor.source, summary, predictor.provenance,
                                                             thumb=224)))

    return app


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _page(predictor, needs_token: bool, result: list[str] | None = None, error: str | None = None) -> str:
    token = '<label>Token <input type="password" name="token" autocomplete="off"></label> ' if needs_token else ""
    parts = [f"<p><b>{AID}</b> Upload a patient's left and right fundus photos (JPEG, PNG or the camera's DICOM; "
             "either may be missing).</p>",
             '<form method="post" enctype="multipart/form-data" id="upload">'
             '<label>Patient <input name="patient_id" value="patient"></label> '
             '<label>Left eye <input type="file" name="left" accept="image/*,.dcm,application/dicom"></label> '
             '<label>Right eye <input type="file" name="right" accept="image/*,.dcm,application/dicom"></label> '
             f'{token}<button type="submit" id="submit">Screen</button></form>']
    if error:
        parts.append(f'<p class="error" id="error" style="color:#b00"><b>Could not screen:</b> {html.escape(error)}</p>')
    if result is None:
        parts.append(prediction_sections([], predictor.source, {"patients": 0, "predicted": 0, "rejected": 0},
                                         predictor.provenance)[1])  # the model's provenance table
    else:
        parts += result
    return page("fundus-ensemble screening station", parts)
