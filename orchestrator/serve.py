"""``serve``: trained tasks behind one HTTP endpoint, on one frozen backbone, with Ray Serve.

The driver loads the tasks (so a bad run, a checkpoint for other weights or runs on different
backbones fail here, in one line, before anything starts) and puts them in Ray's object store.
Each replica takes them from there on whichever node Serve places it: no disk has to be shared.
A replica holds the frozen backbone once and, for E3VA and FIXED, runs it once per image for
every task it is asked for.

    GET  /tasks                        the tasks, their classes and the runs they came from
    POST /predict[?tasks=a,b][&score_threshold=0.3]
                                       an image (raw bytes, or multipart/form-data): per task, what
                                       ``predict`` writes as JSON (its task's ``predict``):
                                       detection, COCO results; segmentation, each class found with its
                                       pixel count and pixels as a COCO RLE; classification, the five
                                       likeliest classes
"""

import asyncio
import email.parser
import email.policy
import io
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from detectors.errors import UserInputError

APP_NAME = "e3va-tasks"
app = FastAPI(title="E3VA tasks", docs_url=None, redoc_url=None)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _first_part(content_type: str, body: bytes) -> bytes:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = list(message.iter_parts()) if message.is_multipart() else []
    files = [part for part in parts if part.get_filename()] or parts
    if not files:
        raise RequestError(400, "the multipart body holds no part (send the image as a form file)")
    return files[0].get_payload(decode=True) or b""


def _decode(data: bytes):
    from PIL import Image, UnidentifiedImageError
    from orchestrator.use import read_picture
    try:
        return read_picture(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(400, "the body is not an image Pillow can decode (PNG, JPEG, BMP, WebP, ...)") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise RequestError(400, f"the image cannot be decoded ({str(exc).splitlines()[0][:120]})") from None


# Serve serialises the class where it is decorated: what its methods use is defined above it
@serve.deployment(name="tasks")
@serve.ingress(app)
class TaskServer:
    """One replica: every task, one frozen backbone, one request's model work at a time."""

    def __init__(self, loaded: list, max_body_bytes: int, score_threshold: float):
        import ray
        import torch
        (reference,) = loaded  # in a list, so Serve hands the reference over instead of resolving it
        self.tasks, self.shared = ray.get(reference)
        self.by_name = {task.name: task for task in self.tasks}
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        for task in self.tasks:
            task.detector.to(device)
        self.max_body_bytes = max_body_bytes
        self.score_threshold = score_threshold
        # the shared frozen pass holds one picture's features: tasks of two requests must not interleave
        self.model_lock = threading.Lock()

    @app.get("/tasks")
    def list_tasks(self) -> dict[str, Any]:
        return {"tasks": [{"name": t.name, "source": t.source, "method": t.cfg.tuning.method,
                           "backbone": t.cfg.backbone.name, "detector": t.cfg.model.detector,
                           "classes": t.classes} for t in self.tasks]}

    @app.post("/predict")
    async def predict(self, request: Request):
        try:
            names = self._selected_tasks(request.query_params.get("tasks"))
            threshold = self._threshold(request.query_params.get("score_threshold"))
            picture = _decode(await self._read_image(request))
        except RequestError as exc:
            return _error(exc.status, str(exc))
        found = await asyncio.to_thread(self._predict, picture, names, threshold)
        return {"width": int(picture.shape[-1]), "height": int(picture.shape[-2]), "tasks": found}

    def _predict(self, picture, names: list[str], threshold: float) -> dict[str, list[dict[str, Any]]]:
        from orchestrator.use import computing_as_trained, predict_tasks
        tasks = [self.by_name[name] for name in names]
        with self.model_lock, computing_as_trained(tasks[0]):
            return predict_tasks(tasks, self.shared, picture, score_threshold=threshold)

    def _selected_tasks(self, asked: str | None) -> list[str]:
        if not asked:
            return list(self.by_name)
        names = [name.strip() for name in asked.split(",") if name.strip()]
        unknown = [name for name in names if name not in self.by_name]
        if unknown or not names:
            raise RequestError(404, f"unknown task {unknown[0] if unknown else asked!r}; "
                                    f"tasks: {', '.join(self.by_name)}")
        return names

    def _threshold(self, asked: str | None) -> float:
        if asked is None:
            return self.score_threshold
        try:
            value = float(asked)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise RequestError(400, f"score_threshold: {asked!r} is not a number from 0 to 1")
        return value

    async def _read_image(self, request: Request) -> bytes:
        """The image's bytes: the body, or the first file (else the first part) of a multipart form."""
        declared = request.headers.get("content-length", "")
        too_large = RequestError(413, f"the body is larger than {self.max_body_bytes} bytes (--max-image-mb)")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_large
        if not body:
            raise RequestError(400, "the body is empty: post an image (raw bytes or a multipart form file)")
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            return _first_part(content_type, bytes(body))
        return bytes(body)


def serve_tasks(sources: Sequence[str], *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0, max_image_mb: float = 20.0,
                score_threshold: float = 0.5, weights: str | None = None, tracking_uri: str | None = None) -> None:
    """Serve the tasks until interrupted (Ctrl-C or SIGTERM), on local Ray or the cluster at $RAY_ADDRESS."""
    import ray
    from orchestrator.cluster import connect
    from orchestrator.console import CONSOLE
    from orchestrator.trained import load_tasks
    from orchestrator.use import print_storage
    if replicas < 1 or cpus_per_replica < 0 or gpus_per_replica < 0 or max_image_mb <= 0:
        raise UserInputError("--replicas must be at least 1, --cpus/--gpus-per-replica at least 0 and "
                             "--max-image-mb above 0")
    tasks, shared = load_tasks(sources, weights=weights, tracking_uri=tracking_uri)
    print_storage(tasks)
    connect()
    try:
        serve.start(http_options={"host": host, "port": port})
        server = TaskServer.options(num_replicas=replicas,
                                    ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
        serve.run(server.bind([ray.put((tasks, shared))], int(max_image_mb * 2**20), score_threshold),
                  name=APP_NAME, route_prefix="/")
        CONSOLE.say(f"serving {len(tasks)} task(s) ({', '.join(t.name for t in tasks)}) with {replicas} "
                    f"replica(s) at http://{host}:{port}: GET /tasks, POST /predict (Ctrl-C stops)")
        _wait_for_a_stop()
        CONSOLE.say("stopping")
    finally:
        serve.shutdown()
        ray.shutdown()
    CONSOLE.say("stopped")


def _wait_for_a_stop() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set():
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
