"""The papers' detector through the commands a user runs: ``run`` with ``model.engine: detectron2``
(Cascade Mask R-CNN with small heads, two Ray Train workers, a local MLflow store), then ``evaluate``
and ``predict`` on that run. Skips where detectron2 is not installed (CI installs it, see README)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"
# the paper's heads take about 20 s a step on 2 cores: these are small
SMALL_HEADS = ("{MODEL.FPN.OUT_CHANNELS: 64, MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE: 64, MODEL.ROI_BOX_HEAD.CONV_DIM: 32,"
               " MODEL.ROI_BOX_HEAD.FC_DIM: 128, MODEL.ROI_MASK_HEAD.CONV_DIM: 32, MODEL.RPN.POST_NMS_TOPK_TRAIN: 256,"
               " MODEL.RPN.POST_NMS_TOPK_TEST: 128}")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_detectron2_cascade_run_finishes_in_mlflow_and_evaluate_and_predict_use_it(tmp_path):
    settings = ["model.engine=detectron2", "model.detector=cascade_mask_rcnn", f"model.options={{opts: {SMALL_HEADS}}}",
                "scaling.workers=2", "schedule.iterations=4", "checkpoint.period=2", "schedule.batch_size=2",
                "data.synthetic.num_train=16", "data.synthetic.num_val=4", f"output_dir={tmp_path}",
                f"data.synthetic.root={tmp_path}/synthetic"]
    result = cli("run", str(TINY), *sum((["--set", s] for s in settings), []))
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("e3va-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert "cascade_mask_rcnn" in json.dumps({**run.data.tags, **run.data.params})
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith(("val_bbox_", "val_segm_"))}
    assert {"val_bbox_AP", "val_bbox_AP50", "val_segm_AP"} <= set(logged)

    again = cli("evaluate", str(tmp_path / "tiny"), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    figures = json.loads(again.stdout)
    for key, value in logged.items():
        assert figures[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key

    predicted = cli("predict", str(tmp_path / "tiny"), "--images", str(tmp_path / "synthetic" / "val"), "--out",
                    str(tmp_path / "predictions"), "--score-threshold", "0")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    images = sorted((tmp_path / "synthetic" / "val").glob("*.png"))
    written = [tmp_path / "predictions" / "tiny" / f"{path.stem}.json" for path in images]
    assert images and all(path.is_file() for path in written)
    results = [r for path in written for r in json.loads(path.read_text())]
    assert results and all({"bbox", "score", "category_id", "segmentation"} <= set(r) for r in results)
