"""``compare`` on a hand-made MLflow store: the papers' table, its ratios to full, both figures."""
import json
import math
import re
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
    add_run(client, methods, "e3va", method_params("e3va", "e3va", 20, 2.0, rank=8, init="linear"),
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
    seeds = experiment_id(client, "seeds", uri)
    for (method, init), (aps, memories) in SEEDED.items():
        for seed, (ap, memory) in enumerate(zip(aps, memories)):
            add_run(client, seeds, f"s-{method}-{init}-{seed}",
                    {**method_params(method, method, 10, 1.0), "seed": seed,
                     "backbone_init": "upstream 300 steps s0" if init == "upstream" else f"random s{seed}"},
                    {"peak_memory_mb": memory, "seconds_per_iteration": 1.0, "val_bbox_AP": ap,
                     "val_bbox_AP50": 2 * ap})
    return uri, parent


# Three seeds of each (method, backbone start): box AP and training memory per seed; AP50 is twice the AP.
SEEDED = {("full", "upstream"): ((40.0, 42.0, 44.0), (2000, 2000, 2000)),
          ("e3va", "upstream"): ((50.0, 51.0, 52.0), (1000, 1100, 1200)),   # clearly above full
          ("fixed", "upstream"): ((30.0, 50.0, 55.0), (900, 900, 900)),     # above full on average, but noisy
          ("full", "random"): ((10.0, 12.0, 14.0), (2000, 2000, 2000)),
          ("e3va", "random"): ((8.0, 9.0, 10.0), (1000, 1000, 1000))}      # clearly below full


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


def cells_by_run(text: str, prefix: str) -> dict[str, list[str]]:
    """The table's rows whose run column starts with ``prefix``, split into cells (two spaces or more apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.startswith(prefix)]
    return {cells[0]: cells for cells in rows}


def test_runs_differing_only_by_their_seed_are_one_row_of_mean_and_std_with_a_mark_beyond_two_standard_errors(
        store, tmp_path, capsys):
    uri, _ = store
    out_dir = tmp_path / "o"
    assert main(["compare", "--experiment", "seeds", "--tracking-uri", uri, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    header = re.split(r"\s{2,}", next(line for line in out.splitlines() if line.startswith("run ")).strip())
    assert header[:5] == ["run", "setting", "method", "variant", "n"]
    rows = cells_by_run(out, "s-")
    assert len(rows) == 5  # 15 runs: 5 (method, backbone start) x 3 seeds
    column = {name: header.index(name) for name in ("setting", "n", "AP box", "AP50", "peak mem (MB)", "vs full")}
    delta = header.index("delta")
    full = rows["s-full-upstream-0 +2"]
    # by hand: mean (40 + 42 + 44) / 3 = 42; sample std sqrt((2² + 0² + 2²) / (3 - 1)) = 2; AP50 twice both
    assert [full[column["n"]], full[column["AP box"]], full[column["AP50"]]] == ["3", "42.0 ± 2.0", "84.0 ± 4.0"]
    assert full[delta] == "+0.0"
    e3va = rows["s-e3va-upstream-0 +2"]
    # mean 51, std 1; memory (1000 + 1100 + 1200) / 3 = 1100, 55% of full's 2000
    assert [e3va[column["AP box"]], e3va[column["peak mem (MB)"]], e3va[column["vs full"]]] == \
        ["51.0 ± 1.0", "1100", "55%"]
    # 51 - 42 = 9 > 2 * sqrt(2²/3 + 1²/3) = 2.58: marked
    assert e3va[delta] == "+9.0*"
    fixed = rows["s-fixed-upstream-0 +2"]
    # mean 45, std sqrt((15² + 5² + 10²) / 2) = 13.2; 45 - 42 = 3 < 2 * sqrt(2²/3 + 175/3) = 15.4: not marked
    assert [fixed[column["AP box"]], fixed[delta]] == ["45.0 ± 13.2", "+3.0"]
    # the random starts (random s0, s1, s2: each the run's own seed) are one setting with its own full
    random_e3va = rows["s-e3va-random-0 +2"]
    assert random_e3va[column["setting"]] == "backbone_init=random"
    assert [random_e3va[column["AP box"]], random_e3va[delta]] == ["9.0 ± 1.0", "-3.0*"]  # 9 - 12, beyond 2.58
    assert "mean ± sample std" in out and "* beyond two standard errors" in out

    groups = {g["name"]: g for g in json.loads((out_dir / "table.json").read_text())}
    assert groups["s-e3va-upstream-0 +2"]["figures"]["val_bbox_AP"] == {"mean": 51.0, "std": 1.0, "n": 3}
    assert groups["s-e3va-upstream-0 +2"]["seeds"] == ["0", "1", "2"]
    difference = groups["s-e3va-upstream-0 +2"]["differences"]["val_bbox_AP"]
    assert difference["value"] == 9.0 and math.isclose(difference["se"], math.sqrt(5 / 3))
    assert difference["significant"]
    assert not groups["s-fixed-upstream-0 +2"]["differences"]["val_bbox_AP"]["significant"]
    assert (out_dir / "ap_vs_memory.png").is_file()


def test_rows_can_be_compared_with_another_method_than_full(store, tmp_path, capsys):
    from detectors.errors import UserInputError
    from orchestrator.compare import compare_runs
    uri, _ = store
    made = compare_runs(uri, experiment="seeds", out=tmp_path / "o", against="fixed")
    header = re.split(r"\s{2,}", next(line for line in made["table"].splitlines() if line.startswith("run ")))
    assert header.count("vs fixed") == 2 and "vs full" not in header
    e3va = cells_by_run(made["table"], "s-e3va-upstream")["s-e3va-upstream-0 +2"]
    # 51 - 45 = 6 < 2 * sqrt(1²/3 + 175/3) = 15.3: not marked; memory 1100 against fixed's 900
    assert e3va[header.index("delta")] == "+6.0" and e3va[header.index("vs fixed")] == "122%"
    assert cells_by_run(made["table"], "s-e3va-random")["s-e3va-random-0 +2"][header.index("delta")] == "-"
    assert "delta: difference of means to fixed of the same setting" in made["table"]
    with pytest.raises(UserInputError, match="--against lora: no such run among these"):
        compare_runs(uri, experiment="seeds", out=tmp_path / "o", against="lora")


def test_with_one_seed_per_row_the_table_has_no_spread_and_no_seed_count(store, tmp_path, capsys):
    uri, _ = store
    for experiment in ("methods", "transfer"):
        out_dir = tmp_path / experiment
        assert main(["compare", "--experiment", experiment, "--tracking-uri", uri, "--out", str(out_dir)]) == 0
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if line.startswith("run "))
        assert " n " not in header and "±" not in out and "*" not in out and "standard errors" not in out
        for group in json.loads((out_dir / "table.json").read_text()):
            assert group["n"] == 1 and group["figures"]["val_bbox_AP"]["std"] is None


def test_a_retried_sweep_trial_counts_once_by_its_finished_attempt(store, tmp_path):
    """A trial that failed, or was cut off by a stop and run again when the sweep resumed, has an MLflow run
    per attempt: its finished one stands for it, so its seed is neither counted twice nor shown as failed."""
    from orchestrator.compare import compare_runs
    uri, _ = store
    client = MlflowClient(uri)
    retried = experiment_id(client, "retried", uri)
    parent = client.create_run(retried, run_name="sweep", tags={"sweep.parent": "true"}).info.run_id

    def attempt(trial, seed, status, ap=None):
        params = {**method_params("e3va", "e3va", 10, 1.0), "seed": seed, "sweep.trial_id": trial}
        run_id = add_run(client, retried, f"e3va-{seed}", params, {"val_bbox_AP": ap} if ap is not None else {},
                         parent=parent)
        client.set_terminated(run_id, status)

    attempt("t_00000", 0, "FAILED")
    attempt("t_00000", 0, "FINISHED", 10.0)
    attempt("t_00001", 1, "FINISHED", 20.0)
    attempt("t_00001", 1, "RUNNING")  # a stale record of a killed attempt after the finished one
    attempt("t_00002", 2, "FINISHED", 30.0)
    compare_runs(uri, experiment="retried", out=tmp_path / "o")
    (group,) = json.loads((tmp_path / "o" / "table.json").read_text())
    assert group["n"] == 3 and group["seeds"] == ["0", "1", "2"] and group["status"] == "finished"
    assert group["figures"]["val_bbox_AP"] == {"mean": 20.0, "std": 10.0, "n": 3}


def test_a_run_from_before_a_hyperparameter_existed_groups_with_runs_at_its_default(store, tmp_path):
    """E3VA's ``recompute`` (a memory option, the same arithmetic) came after some runs were made: a run that
    does not name it ran at its default, and counts as a seed of the same row as runs that log it."""
    from orchestrator.compare import compare_runs
    uri, _ = store
    client = MlflowClient(uri)
    older = experiment_id(client, "older", uri)
    for seed, ap, extra in ((0, 10.0, {}), (1, 20.0, {"recompute": "False"}), (2, 30.0, {"recompute": "False"})):
        add_run(client, older, f"e3va-{seed}", {**method_params("e3va", "e3va", 10, 1.0, rank=8, init="linear"),
                                                 "seed": seed, **extra}, {"val_bbox_AP": ap})
    add_run(client, older, "e3va-recompute", {**method_params("e3va", "e3va", 10, 1.0, rank=8, init="linear"),
                                              "seed": 0, "recompute": "True"}, {"val_bbox_AP": 5.0})
    compare_runs(uri, experiment="older", out=tmp_path / "o")
    groups = json.loads((tmp_path / "o" / "table.json").read_text())
    assert sorted((g["n"], g["figures"]["val_bbox_AP"]["mean"]) for g in groups) == [(1, 5.0), (3, 20.0)]
