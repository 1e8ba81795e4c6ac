"""``compare`` on a hand-made MLflow store: the papers' table, its ratios to full, both figures."""
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.cli import main  # noqa: E402
from orchestrator.tracking import experiment_id  # noqa: E402


def add_run(client, experiment_id, name, params, metrics, parent=None):
    tags = {"mlflow.parentRunId": parent} if parent else None
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        for step in (1, 2, 3):
            client.log_metric(run_id, key, value, step=step)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def method_params(method, variant, trainable, percent, **hyper):
    return {"method": method, "variant": variant, "trainable_params": trainable, "trainable_percent": percent, **hyper}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    client = MlflowClient(uri)
    methods = experiment_id(client, "methods", uri)
    add_run(client, methods, "full", method_params("full", "full", 1000, 100.0),
            {"peak_memory_mb": 2000, "seconds_per_iteration": 1.0, "val_bbox_AP": 40.0, "val_segm_AP": 35.0})
    add_run(client, methods, "e3va", method_params("e3va", "e3va", 20, 2.0, rank=8, init="kaiming"),
            {"peak_memory_mb": 1000, "seconds_per_iteration": 0.5, "val_bbox_AP": 39.0, "val_segm_AP": 34.5})
    grid = experiment_id(client, "grid", uri)
    parent = client.create_run(grid, run_name="lorand-grid", tags={"sweep.parent": "true"}).info.run_id
    client.set_tag(parent, "sweep.space", '["tuning.hyperparameters.branches", "tuning.hyperparameters.kernel"]')
    for branches in (2, 4):
        for kernel in (4, 8, 16):
            add_run(client, grid, f"lorand-b{branches}-k{kernel}",
                    {**method_params("lorand", "lorand", branches * kernel, 1.0, branches=branches, kernel=kernel),
                     "tuning.hyperparameters.branches": branches, "tuning.hyperparameters.kernel": kernel},
                    {"seconds_per_iteration": 0.3, "val_bbox_AP": 30 + branches + kernel / 4}, parent=parent)
    transfer = experiment_id(client, "transfer", uri)
    for init, images, full_ap, e3va_ap in (("upstream", 32, 30.0, 31.0), ("upstream", 256, 50.0, 47.0),
                                           ("random", 32, 10.0, 4.0)):
        for method, ap, memory in (("full", full_ap, 2000), ("e3va", e3va_ap, 800)):
            add_run(client, transfer, f"t-{method}-{init}-{images}",
                    {**method_params(method, method, 10, 1.0), "backbone_init": init, "train_images": images,
                     "tuning.method": method, "data.synthetic.num_train": images},
                    {"peak_memory_mb": memory, "seconds_per_iteration": 1.0, "val_bbox_AP": ap,
                     "val_bbox_AP50": 2 * ap})
    return uri, parent


def test_runs_in_several_settings_are_compared_with_the_full_run_of_their_own(store, tmp_path, capsys):
    """A transfer benchmark: each (backbone start, data budget) is a block with its own full reference."""
    uri, _ = store
    assert main(["compare", "--experiment", "transfer", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("run "))
    assert header.split()[:3] == ["run", "setting", "method"] and "AP50" in header
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("t-")}
    assert len(rows) == 6
    e3va_small = rows["t-e3va-upstream-32"]
    assert e3va_small[1:3] == ["backbone_init=upstream", "train_images=32"]
    # against full at 32 images from the pre-training (30.0), not any other full run
    assert e3va_small[-6:-3] == ["31.0", "62.0", "+1.0"] and "40%" in e3va_small
    assert rows["t-e3va-upstream-256"][-6:-3] == ["47.0", "94.0", "-3.0"]
    assert rows["t-e3va-random-32"][-6:-3] == ["4.0", "8.0", "-6.0"]
    order = [line.split()[0] for line in out.splitlines() if line.startswith("t-")]
    assert order.index("t-full-random-32") < order.index("t-full-upstream-256")  # grouped by setting


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("full", "e3va", "lorand-"))]


def test_the_table_gives_ratios_and_deltas_to_full(store, tmp_path, capsys):
    uri, _ = store
    assert main(["compare", "--experiment", "methods", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    full, e3va = table_lines(out)
    assert full.split()[:3] == ["full", "full", "full"]
    cells = e3va.split()
    assert cells[:3] == ["e3va", "e3va", "e3va"]  # rank 8 is e3va's default: no hyperparameter shown
    assert cells[3:] == ["0.000", "2.00", "1000", "50%", "0.500", "50%", "39.0", "-", "-1.0", "34.5", "-0.5",
                         "finished"]
    assert "note: no heat map" in out  # only one method per row: nothing swept twice
    assert (tmp_path / "out" / "ap_vs_memory.png").is_file()


def test_a_sweep_parent_gives_a_heat_map_and_no_full_row_gives_dashes(store, tmp_path, capsys):
    from PIL import Image
    uri, parent = store
    out_dir = tmp_path / "out"
    assert main(["compare", "--parent", parent, "--tracking-uri", uri, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    rows = table_lines(out)
    assert len(rows) == 6
    assert rows[0].split()[7:11] == ["-", "-", "0.300", "-"]  # no peak memory, no full row: no ratios
    assert "x axis is seconds per iteration" in out
    for name in ("ap_vs_memory.png", "ap_heatmap.png"):
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent, "compare")}
    assert {"compare/ap_heatmap.png", "compare/ap_vs_memory.png", "compare/table.txt"} <= artifacts


def test_bad_requests_fail_in_one_line(store, tmp_path, capsys):
    uri, parent = store
    cases = [(["--experiment", "nope"], "no such MLflow experiment"),
             ([], "give --experiment NAME, --parent RUN_ID or both"),
             (["--parent", "0123abcd"], "no such MLflow run"),
             (["--experiment", "methods", "--heatmap", "rank,kernel"], "does not vary among these runs"),
             (["--tracking-uri", f"sqlite:///{tmp_path}/missing.db", "--experiment", "x"], "no MLflow store")]
    for args, message in cases:
        if "--tracking-uri" not in args:
            args = [*args, "--tracking-uri", uri]
        assert main(["compare", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
    assert not Path(f"{tmp_path}/missing.db").exists()
