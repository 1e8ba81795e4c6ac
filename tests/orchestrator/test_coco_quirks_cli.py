"""COCO files as people have them, through the commands a user types: ``run`` on a file holding every quirk
(good and quirky entries mixed) finishes with COCO figures, ``evaluate`` and ``predict`` work on its pictures
in every mode, and an entry that cannot be used stops ``run`` before anything starts, in one line naming it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402
from quirky_coco import CATEGORIES, write_quirky_coco  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"
FAST = ["schedule.iterations=2", "checkpoint.period=0", "schedule.batch_size=2", "schedule.warmup_iterations=1",
        "model.options.box_score_thresh=0.0",  # an untrained model predicts something: its ids are checked
        "schedule.decay_at=[]"]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout)


def on_files(images: Path, annotations: Path, out: Path) -> list[str]:
    fields = ["data.synthetic=null", f"data.train_images={images}", f"data.train_json={annotations}",
              f"data.val_images={images}", f"data.val_json={annotations}", f"output_dir={out}", *FAST]
    return sum((["--set", field] for field in fields), [])


@pytest.fixture(scope="module")
def quirky_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quirky")
    images, annotations = write_quirky_coco(tmp)
    result = cli("run", str(TINY), *on_files(images, annotations, tmp / "out"), timeout=900)
    return {"result": result, "images": images, "annotations": annotations, "run_dir": tmp / "out" / "tiny",
            "uri": f"sqlite:///{tmp / 'out'}/mlflow.db"}


def test_a_run_on_a_file_of_every_quirk_finishes_with_coco_figures(quirky_run):
    result = quirky_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    client = MlflowClient(quirky_run["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("e3va-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"val_bbox_AP", "val_segm_AP"} <= set(run.data.metrics)


def test_evaluate_and_predict_take_the_quirky_files(quirky_run, tmp_path):
    assert quirky_run["result"].returncode == 0
    evaluated = cli("evaluate", str(quirky_run["run_dir"]), "--data", str(quirky_run["images"]),
                    str(quirky_run["annotations"]), "--json", "--out", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert {"val_bbox_AP", "val_segm_AP"} <= set(json.loads(evaluated.stdout))
    pictures = [quirky_run["images"] / name for name in ("sub/palette.png", "sub/gray.png", "sub/deeper/rgba.png",
                                                         "gray16.png", "portrait.jpg")]
    predicted = cli("predict", str(quirky_run["run_dir"]), "--images", *map(str, pictures), "--out",
                    str(tmp_path / "p"), "--score-threshold", "0")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    found = [item for p in pictures for item in json.loads((tmp_path / "p" / "tiny" / f"{p.stem}.json").read_text())]
    named = {(item["category_id"], item["category_name"]) for item in found}
    assert len(named) >= 2 and named <= {(c["id"], c["name"]) for c in CATEGORIES}  # the file's ids, with gaps


@pytest.mark.parametrize("broken, named", [
    ({"image_id": 99}, "annotation id 1 has image_id 99, not in 'images'"),
    ({"category_id": 7}, "annotation id 1 has category_id 7, not in 'categories'"),
    ({"bbox": None}, "annotation id 1 has no valid 'bbox' [x, y, w, h]: None"),
])
def test_an_entry_that_cannot_be_used_stops_run_before_it_starts_in_one_line(tmp_path, broken, named):
    images, annotations = write_quirky_coco(tmp_path)
    data = json.loads(annotations.read_text())
    data["annotations"][0].update(broken)
    annotations.write_text(json.dumps(data))
    result = cli("run", str(TINY), *on_files(images, annotations, tmp_path / "out"), timeout=300)
    assert result.returncode == 2 and result.stderr == f"error: {annotations}: {named}\n", result.stderr[-2000:]
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing started
