"""After training: a finished demo run's model evaluated again, predicting with pictures, several
tasks on one frozen backbone, and bad input answered in one line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"
FAST = ["schedule.iterations=4", "checkpoint.period=2", "schedule.batch_size=2",
        "data.synthetic.num_train=16", "data.synthetic.num_val=4"]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One demo run, trained through Ray and MLflow as a user runs it."""
    root = tmp_path_factory.mktemp("finished")
    result = cli("run", str(DEMO), *sum((["--set", s] for s in FAST), []), "--set", f"output_dir={root}",
                 "--set", f"data.synthetic.root={root}/synthetic", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("e3va-tiny").experiment_id])
    return {"root": root, "run_dir": root / "tiny", "uri": uri, "run": run, "val": root / "synthetic" / "val"}


def logged_figures(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith(("val_bbox_", "val_segm_"))}


def assert_same_figures(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and len(ours) >= 12
    for key, value in theirs.items():
        assert (math.isnan(value) and math.isnan(ours[key])) or abs(ours[key] - value) <= 1e-6, key


def test_evaluate_reproduces_the_figures_the_run_logged(finished):
    result = cli("evaluate", str(finished["run_dir"]), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_figures(json.loads(result.stdout), logged_figures(finished["run"]))
    assert (finished["run_dir"] / "evaluation-again.json").is_file()


def test_evaluate_an_mlflow_run_and_log_the_figures_to_it(finished, tmp_path):
    run_id = finished["run"].info.run_id
    result = cli("evaluate", f"runs:/{run_id}", "--tracking-uri", finished["uri"], "--out", str(tmp_path / "e.json"),
                 "--log")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AP50" in result.stdout and "segm" in result.stdout  # the demo's table
    written = json.loads((tmp_path / "e.json").read_text())
    assert_same_figures(written, logged_figures(finished["run"]))
    metrics = MlflowClient(finished["uri"]).get_run(run_id).data.metrics
    assert abs(metrics["evaluate_bbox_AP"] - metrics["val_bbox_AP"]) <= 1e-6


def test_predict_writes_coco_results_and_pictures_with_the_boxes_drawn(finished, tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    from orchestrator.use import predict_images
    images = sorted(finished["val"].glob("*.png"))
    predict_images([str(finished["run_dir"])], [str(finished["val"])], str(tmp_path / "out"), score_threshold=0.3)
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 160, "height": 128} for i in range(1, len(images) + 1)],
                  "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)], "annotations": []}
    gt.createIndex()
    drawn_any = False
    for image_id, path in enumerate(images, start=1):
        results = json.loads((tmp_path / "out" / "tiny" / f"{path.stem}.json").read_text())
        if results:
            loaded = gt.loadRes(results)  # pycocotools reads them as results
            assert len(loaded.anns) == len(results)
            assert all(r["category_name"] in {"circle", "square", "triangle"} and r["score"] >= 0.3 for r in results)
        original = np.asarray(Image.open(path).convert("RGB")).astype(int)
        picture = np.asarray(Image.open(tmp_path / "out" / "tiny" / f"{path.stem}.png")).astype(int)
        assert picture.shape == original.shape
        near = np.zeros(original.shape[:2], bool)
        for x, y, w, h in (r["bbox"] for r in results):
            x1, y1 = max(int(x) - 3, 0), max(int(y) - 3, 0)
            near[y1:int(y + h) + 4, x1:int(x + w) + 4] = True
            left, middle = int(round(x)), int(y + h / 2)
            assert (picture[middle, left] != original[middle, left]).any()  # on the box's left edge
            drawn_any = True
        assert (picture[~near] == original[~near]).all()  # nothing drawn away from every box
    assert drawn_any


def test_three_tasks_share_one_frozen_pass_and_predict_as_alone(finished, tmp_path):
    from orchestrator.use import predict_images
    val = str(finished["val"])
    alone = predict_images([str(finished["run_dir"])], [val], str(tmp_path / "alone"), score_threshold=0.0)
    together = predict_images([str(finished["run_dir"])] * 3, [val], str(tmp_path / "together"), score_threshold=0.0)
    assert together["tasks"] == ["tiny-1", "tiny-2", "tiny-3"]
    assert alone["frozen_passes"] == together["frozen_passes"] == len(together["images"])  # once per image
    for path in (tmp_path / "alone" / "tiny").glob("*.json"):
        for task in together["tasks"]:
            assert (tmp_path / "together" / task / path.name).read_text() == path.read_text()


def test_bad_input_is_one_line_and_writes_nothing(finished, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    result = cli("predict", str(finished["run_dir"]), "--images", str(broken), "--out", str(out))
    assert result.returncode == 2 and not out.exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "broken.png: cannot decode it as an image" in line

    result = cli("evaluate", "runs:/0123456789abcdef", "--tracking-uri", finished["uri"], "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runs:/0123456789abcdef: no such MLflow run" in result.stderr.strip().splitlines()[-1]

    # another seed is another frozen initialisation: not the backbone the checkpoint was trained on
    result = cli("evaluate", str(finished["run_dir"]), "--set", "seed=5", "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was trained on other frozen weights" in result.stderr.strip().splitlines()[-1]


def test_runs_on_different_frozen_backbones_are_refused_by_name(finished, monkeypatch, tmp_path):
    import shutil

    from detectors.errors import UserInputError
    from orchestrator import trained
    real = trained.load_trained

    def load(source, **kwargs):  # the second run as if trained from other weights
        task = real(source, **kwargs)
        if source.endswith("other"):
            task.state = {**task.state, "identity": {**task.state["identity"], "fingerprint": "f" * 64}}
        return task
    monkeypatch.setattr(trained, "load_trained", load)
    run, other = str(finished["run_dir"]), tmp_path / "other"
    other.mkdir()
    shutil.copy(finished["run_dir"] / "experiment.yaml", other)  # the same run's checkpoints, found from its file
    with pytest.raises(UserInputError, match=rf"{other} and {run} were trained on different frozen backbones"):
        trained.load_tasks([run, str(other)])


def free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(url: str, body: bytes | None = None, content_type: str = "application/octet-stream"):
    """(status, JSON) of a GET, or of a POST of ``body``."""
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "e3va-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def with_image_id_1(found):
    """What serve answers for one picture (its image id 1) of what predict wrote for its nth."""
    return [{**r, "image_id": 1} for r in found] if isinstance(found, list) else {**found, "image_id": 1}


def test_serve_answers_as_predict_does_and_keeps_serving_after_bad_requests(finished, trained_classification,
                                                                            trained_segmentation, tmp_path):
    """Two detection runs, a classification and a segmentation run on one frozen backbone, in one server."""
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.use import predict_images
    run = str(finished["run_dir"])
    others = [str(trained_classification["run_dir"]), str(trained_segmentation["run_dir"])]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", run, run, *others, "--port", str(port),
                               "--max-image-mb", "1", "--score-threshold", "0.0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "serve did not come up in 300 s"
            try:  # until the application is up, Serve's proxy answers 404 or 503 in plain text
                status, listed = http(f"{url}/tasks")
                if status == 200:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        names = ["tiny-1", "tiny-2", "tiny_classification", "tiny_segmentation"]
        assert status == 200 and [t["name"] for t in listed["tasks"]] == names
        assert {c["name"] for c in listed["tasks"][0]["classes"]} == {"circle", "square", "triangle"}
        assert listed["tasks"][1]["source"] == run

        predicted = predict_images([run, *others], [str(finished["val"])], str(tmp_path / "predicted"),
                                   score_threshold=0.0)
        images = sorted(finished["val"].glob("*.png"))
        # the detection tasks read the picture alike and share a frozen pass; the others resize it their way
        assert predicted["frozen_passes"] == 3 * len(images)
        for index, path in enumerate(images, start=1):
            expected = {task: with_image_id_1(json.loads((tmp_path / "predicted" / task / f"{path.stem}.json")
                                                         .read_text()))
                        for task in ("tiny", "tiny_classification", "tiny_segmentation")}
            status, answer = http(f"{url}/predict", path.read_bytes(), "image/png")
            assert status == 200 and answer["tasks"] == {"tiny-1": expected["tiny"], "tiny-2": expected["tiny"],
                                                         "tiny_classification": expected["tiny_classification"],
                                                         "tiny_segmentation": expected["tiny_segmentation"]}
        status, answer = http(f"{url}/predict?tasks=tiny-2", *multipart(images[0].name, images[0].read_bytes()))
        assert status == 200 and list(answer["tasks"]) == ["tiny-2"]

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: http(f"{url}/predict", images[0].read_bytes()), range(20)))
        first = http(f"{url}/predict", images[0].read_bytes())
        assert all(a == first for a in answers) and first[0] == 200

        for body, query, code, says in ((b"not an image", "", 400, "not an image"),
                                        (images[0].read_bytes(), "?tasks=nope", 404, "unknown task 'nope'"),
                                        (bytes(2 * 2**20), "", 413, "larger than")):
            status, answer = http(f"{url}/predict{query}", body)
            assert status == code and list(answer) == ["error"] and says in answer["error"]
            assert "\n" not in answer["error"]
        assert http(f"{url}/predict", images[0].read_bytes()) == first  # still serving
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == "stopped"


def test_serve_refuses_a_run_that_does_not_exist_before_starting(finished):
    result = cli("serve", "runs:/0123456789abcdef", "--tracking-uri", finished["uri"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runs:/0123456789abcdef: no such MLflow run" in result.stderr.strip().splitlines()[-1]
