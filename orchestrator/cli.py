"""``python -m orchestrator <command>``: argument parsing and dispatch, nothing else.

Each command is two functions side by side: ``_<command>_arguments`` adds its subparser, ``_cmd_<command>``
runs it (importing what it needs only then, so a mistyped flag answers at once).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from detectors.errors import UserInputError


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["rank=8", "init=zero_up"]`` -> ``{"rank": 8, "init": "zero_up"}`` (values read as YAML)."""
    from orchestrator.config import parse_override
    return dict(parse_override(item) for item in items)


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 512x640") from None
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return height, width


# ----------------------------------------------------------------------------- arguments several commands take

def _add_set(parser: argparse.ArgumentParser, what: str = "a field", example: str = "schedule.lr=0.001",
             metavar: str = "KEY.PATH=VALUE") -> None:
    parser.add_argument("--set", action="append", default=[], metavar=metavar,
                        help=f"override {what}, e.g. {example} (repeatable)")


def _add_verbose(parser: argparse.ArgumentParser, shows: str = "Ray's, pycocotools' and MLflow's output",
                 kept_in: str | None = "the run's log file") -> None:
    where = f" (else in {kept_in}; or set E3VA_VERBOSE=1)" if kept_in else ""
    parser.add_argument("--verbose", action="store_true", help=f"show {shows} too{where}")


def _add_trained_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="the frozen backbone's weights (default: the experiment's backbone.weights)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for runs:/<run_id> (default: $MLFLOW_TRACKING_URI)")
    _add_verbose(parser, "pycocotools' and MLflow's output", kept_in=None)


def _json_flag(parser: argparse.ArgumentParser, what: str = "JSON") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} instead of a table")


# ----------------------------------------------------------------------------- the commands

def _params_arguments(commands) -> None:
    params = commands.add_parser("params", help="trainable parameters of tuned backbones, as in the papers")
    params.add_argument("--backbone", default="swin_b", help="swin_t, swin_s, swin_b, swin_l, swin_b_384, swin_l_384")
    params.add_argument("--method", default=None, help="a tuning method or named variant (default: all)")
    _add_set(params, "a hyperparameter", "rank=16", metavar="KEY=VALUE")
    params.add_argument("--all", action="store_true", help="every method and variant (the default without --method)")
    _json_flag(params)
    params.set_defaults(func=_cmd_params)


def _cmd_params(args: argparse.Namespace) -> int:
    from orchestrator.params import print_params
    print_params(args.backbone, args.method, parse_assignments(args.set), show_all=args.all, as_json=args.json)
    return 0


def _bench_arguments(commands) -> None:
    bench = commands.add_parser("bench", help="memory and time of tuning methods, side by side in one process")
    bench.add_argument("--backbone", default="swin_t")
    bench.add_argument("--methods", default="full,fixed,adapter,lora,lorand,e3va",
                       help="comma-separated methods or variants; ratios are to full and fixed")
    bench.add_argument("--size", type=parse_size, default=(512, 640), help="HEIGHTxWIDTH (default 512x640)")
    bench.add_argument("--batch", type=int, default=2)
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--repeats", type=int, default=18,
                       help="timed steps per method, interleaved in rotating order (default 18)")
    bench.add_argument("--detector", default=None,
                       help="measure a whole detector training step: mask_rcnn, faster_rcnn, retinanet "
                            "(torchvision), cascade_mask_rcnn (detectron2), or a model such as upernet or linear; "
                            "default: the backbone alone")
    bench.add_argument("--engine", default=None, help="detector engine (default: the one that has --detector)")
    _json_flag(bench, "a JSON list")
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from orchestrator.bench import run_bench
    run_bench(backbone=args.backbone, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
              size=args.size, batch=args.batch, device=args.device, repeats=args.repeats, as_json=args.json,
              detector=args.detector, engine=args.engine)
    return 0


def _bench_tasks_arguments(commands) -> None:
    tasks = commands.add_parser("bench-tasks", help="N tasks on one frozen backbone against N separate models: "
                                                    "time per image and weights held, side by side")
    tasks.add_argument("--tasks", type=int, default=3)
    tasks.add_argument("--method", default="e3va")
    tasks.add_argument("--backbone", default="swin_t")
    tasks.add_argument("--detector", default="mask_rcnn")
    tasks.add_argument("--size", type=parse_size, default=(512, 640), help="HEIGHTxWIDTH (default 512x640)")
    tasks.add_argument("--images", type=int, default=2, help="images per round")
    tasks.add_argument("--rounds", type=int, default=5, help="alternating rounds of both arms")
    tasks.set_defaults(func=_cmd_bench_tasks)


def _cmd_bench_tasks(args: argparse.Namespace) -> int:
    from orchestrator.bench import run_bench_tasks
    run_bench_tasks(args.tasks, args.method, args.backbone, args.detector, args.size, args.images, args.rounds)
    return 0


def _bench_startup_arguments(commands) -> None:
    startup = commands.add_parser("bench-startup", help="what a run does before its first step on COCO- and "
                                                        "ADE20K-sized files (written once): seconds and memory")
    startup.add_argument("--folder", default="outputs/startup", help="where the files are written and kept")
    startup.add_argument("--dataset", choices=("both", "coco", "ade20k"), default="both")
    startup.add_argument("--loader-workers", type=int, default=2, help="forked data-loading processes to measure")
    startup.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes (a quick look)")
    _json_flag(startup)
    startup.set_defaults(func=_cmd_bench_startup)


def _cmd_bench_startup(args: argparse.Namespace) -> int:
    import json

    from orchestrator.startup import print_startup_table, run_startup_bench
    if not 0 < args.scale <= 1:
        raise UserInputError(f"--scale must be in (0, 1], got {args.scale}")
    which = {"coco": args.dataset in ("both", "coco"), "ade20k": args.dataset in ("both", "ade20k")}
    results = run_startup_bench(args.folder, args.loader_workers, **which, scale=args.scale,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_startup_table(results)
    return 0


def _run_arguments(commands) -> None:
    run = commands.add_parser("run", help="train one experiment with Ray Train, tracked in MLflow")
    run.add_argument("experiment", help="experiment YAML file")
    _add_set(run)
    _add_verbose(run)
    run.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.config import load_experiment
    cfg = load_experiment(args.experiment, args.set)
    from orchestrator.console import CONSOLE, internals_to, verbose_requested
    from orchestrator.run import preflight, run_experiment
    from orchestrator.summary import print_summary
    checked = preflight(cfg)  # bad input is one line before the run's folder and log exist
    with internals_to(cfg.run_dir / "run.log", verbose_requested(args.verbose)):
        outcome = run_experiment(cfg, show_progress=True, checked=checked)
        print_summary(cfg, outcome)
        CONSOLE.say(f"finished: MLflow run {outcome['run_id']} in {outcome['tracking_uri']}")
    return 0


def _sweep_arguments(commands) -> None:
    sweep = commands.add_parser("sweep", help="an ablation sweep with Ray Tune: one Ray Train run per trial")
    sweep.add_argument("sweep", help="sweep YAML file (see experiments/ablations/)")
    _add_set(sweep, "a field of the base experiment", "schedule.iterations=4, or of the sweep with a sweep. "
                                                      "prefix, e.g. sweep.max_concurrent_trials=1")
    _add_verbose(sweep, "Ray's and MLflow's output", kept_in="the sweep's log file")
    sweep.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.console import CONSOLE, internals_to, verbose_requested
    from orchestrator.sweep import load_sweep, run_sweep
    sweep = load_sweep(args.sweep, args.set)
    with internals_to(sweep.dir / "sweep.log", verbose_requested(args.verbose)):
        outcome = run_sweep(sweep)
        if outcome["interrupted"]:
            return 130
        CONSOLE.say(f"finished: sweep {sweep.name} under MLflow run {outcome['parent_run_id']} in "
                    f"{outcome['tracking_uri']}")
    return 1 if outcome["counts"]["failed"] else 0


def _compare_arguments(commands) -> None:
    compare = commands.add_parser("compare", help="the papers' table and figures from MLflow runs")
    compare.add_argument("--experiment", default=None, help="MLflow experiment name (its runs are the rows)")
    compare.add_argument("--parent", default=None, metavar="RUN_ID", help="a sweep's parent run (its children)")
    compare.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db)")
    compare.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default outputs/compare)")
    compare.add_argument("--against", default=None, metavar="METHOD",
                         help="compare each setting's rows with this method's runs instead of full's (e.g. fixed)")
    compare.add_argument("--heatmap", default=None, metavar="P1,P2",
                         help="the two swept params of the heat map (default: the first two that vary)")
    compare.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from orchestrator.compare import compare_runs
    compare_runs(args.tracking_uri, experiment=args.experiment, parent_run_id=args.parent, out=args.out,
                 heatmap=args.heatmap, against=args.against)
    return 0


def _overhead_arguments(commands) -> None:
    overhead = commands.add_parser("overhead", help="seconds per iteration through a 1-worker TorchTrainer vs "
                                                    "the plain loop in this process, side by side")
    overhead.add_argument("experiment", help="experiment YAML file (schedule.iterations sets the length)")
    _add_set(overhead)
    overhead.add_argument("--rounds", type=int, default=2, help="alternating rounds of both paths")
    overhead.set_defaults(func=_cmd_overhead)


def _cmd_overhead(args: argparse.Namespace) -> int:
    from orchestrator.config import load_experiment
    cfg = load_experiment(args.experiment, args.set)
    from orchestrator.overhead import measure_overhead, print_overhead
    print_overhead(measure_overhead(cfg, rounds=args.rounds), cfg.schedule.iterations or 0)
    return 0


def _plan_arguments(commands) -> None:
    plan = commands.add_parser("plan", help="E3VA's Table 4 for an experiment: predicted training memory per "
                                            "method and batch, and which GPUs hold it")
    plan.add_argument("experiment", help="experiment YAML file (its largest training size is planned for)")
    _add_set(plan)
    plan.add_argument("--gpus", default="1080ti=11,p100=16,3090=24,v100=32", metavar="KIND=GiB,...",
                      help="GPU kinds and their memory (default: E3VA's Table 4)")
    plan.add_argument("--methods", default=None,
                      help="comma-separated methods (default: full,bitfit,adapter,lora,e3va and the experiment's)")
    plan.add_argument("--batches", default="1,2", help="batch sizes per GPU (default 1,2)")
    plan.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to profile")
    plan.add_argument("--profile-sizes", default=None, metavar="HxW,...",
                      help="profiling sizes (default: 1/4, 3/8, 1/2 of the training size)")
    plan.add_argument("--reserve", type=float, default=0.5, metavar="GiB",
                      help="memory kept free on each GPU (CUDA context, fragmentation; default 0.5)")
    _json_flag(plan)
    plan.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.plan import parse_batches, parse_gpus, parse_list, parse_sizes, plan_experiment
    gpus, batches = parse_gpus(args.gpus), parse_batches(args.batches)
    methods = parse_list(args.methods, "--methods") if args.methods is not None else None
    sizes = parse_sizes(args.profile_sizes) if args.profile_sizes else None
    from orchestrator.config import load_experiment
    cfg = load_experiment(args.experiment, args.set)
    plan_experiment(cfg, gpus, methods, batches, device=args.device, as_json=args.json, sizes=sizes,
                    reserve_gib=args.reserve)
    return 0


def _evaluate_arguments(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="the figures of a trained run's model (COCO AP, mIoU, accuracy), "
                                                    "again or on other data")
    evaluate.add_argument("run", help="a run directory, a checkpoint directory or runs:/<run_id>")
    evaluate.add_argument("--data", nargs="+", default=None, metavar="PATH",
                          help="other data, as the run's task reads it (default: the run's validation split): a "
                               "detection run takes IMAGES ANNOTATIONS (COCO), other tasks the FOLDER their data.root "
                               "names")
    _add_set(evaluate, "a field of the run's experiment", "data.test_short_edge=640")
    evaluate.add_argument("--out", default=None, metavar="FILE",
                          help="the evaluation JSON (default: evaluation-again.json in the run directory)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object, named as in MLflow")
    evaluate.add_argument("--log", action="store_true", help="log the figures to the run's MLflow run as evaluate_*")
    _add_trained_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestrator.console import internals_to, verbose_requested
    from orchestrator.use import evaluate_run
    with internals_to(_scratch_log("evaluate"), verbose_requested(args.verbose), announce=not args.json):
        evaluate_run(args.run, data=args.data, overrides=args.set, weights=args.weights,
                     tracking_uri=args.tracking_uri, out=args.out, as_json=args.json, log=args.log)
    return 0


def _predict_arguments(commands) -> None:
    predict = commands.add_parser("predict", help="detections of trained runs on images: JSON and pictures; "
                                                  "several runs share one frozen backbone")
    predict.add_argument("runs", nargs="+", help="run directories, checkpoint directories or runs:/<run_id>")
    predict.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    predict.add_argument("--out", required=True, metavar="DIR", help="where <task>/<image>.json and .png go")
    predict.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    _add_trained_arguments(predict)
    predict.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.console import internals_to, verbose_requested
    from orchestrator.use import predict_images
    with internals_to(_scratch_log("predict"), verbose_requested(args.verbose)):
        predict_images(args.runs, args.images, args.out, score_threshold=args.score_threshold, weights=args.weights,
                       tracking_uri=args.tracking_uri)
    return 0


def _serve_arguments(commands) -> None:
    serve = commands.add_parser("serve", help="trained runs behind one HTTP endpoint with Ray Serve, on one frozen "
                                              "backbone: POST /predict, GET /tasks")
    serve.add_argument("runs", nargs="+", help="run directories, checkpoint directories or runs:/<run_id>")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="replicas, each holding every task")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0)
    serve.add_argument("--gpus-per-replica", type=float, default=0.0)
    serve.add_argument("--max-image-mb", type=float, default=20.0, help="larger request bodies get 413")
    serve.add_argument("--score-threshold", type=float, default=0.5,
                       help="keep detections scoring at least this (a request's ?score_threshold= overrides it)")
    _add_trained_arguments(serve)
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator.console import internals_to, verbose_requested
    from orchestrator.serve import serve_tasks
    with internals_to(_scratch_log("serve"), verbose_requested(args.verbose)):
        serve_tasks(args.runs, host=args.host, port=args.port, replicas=args.replicas,
                    cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                    max_image_mb=args.max_image_mb, score_threshold=args.score_threshold, weights=args.weights,
                    tracking_uri=args.tracking_uri)
    return 0


def _scratch_log(command: str):
    import tempfile
    from pathlib import Path
    return Path(tempfile.gettempdir()) / f"e3va-{command}.log"


def _pretrain_arguments(commands) -> None:
    pretrain = commands.add_parser("pretrain", help="pre-train a small Swin on the synthetic upstream task (or find "
                                                    "it in the cache); prints the checkpoint's path")
    pretrain.add_argument("--steps", type=int, default=None, help="training steps (default: UpstreamSpec's, a few "
                                                                  "minutes on 2 CPU cores)")
    pretrain.add_argument("--seed", type=int, default=None)
    pretrain.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    pretrain.add_argument("--cache-dir", default=None, metavar="DIR", help="default outputs/pretrained")
    _add_set(pretrain, "any other field of the spec", "batch_size=64 or backbone=swin_t", metavar="KEY=VALUE")
    pretrain.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from detectors.upstream import spec_from
    from orchestrator.pretrain import run_pretrain
    values = parse_assignments(args.set)
    for name in ("steps", "seed", "device", "cache_dir"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    path = run_pretrain(spec_from(values))
    print(path)
    return 0


def _demo_arguments(commands) -> None:
    demo = commands.add_parser("demo", help="train an E3VA detector (or another task's model) on synthetic data "
                                            "via local Ray and MLflow")
    demo.add_argument("--task", default="detection",
                      help="the task whose demo runs: detection (default), Mask R-CNN, experiments/demo.yaml; "
                           "another, experiments/demo_<task>.yaml (segmentation: UPerNet)")
    _add_set(demo, "a field of the demo's experiment")
    _add_verbose(demo)
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.console import verbose_requested
    from orchestrator.demo import run_demo
    run_demo(args.set, verbose=verbose_requested(args.verbose), task=args.task)
    return 0


COMMANDS = (_params_arguments, _bench_arguments, _bench_tasks_arguments, _bench_startup_arguments, _run_arguments,
            _sweep_arguments, _compare_arguments, _overhead_arguments, _plan_arguments, _evaluate_arguments,
            _predict_arguments, _serve_arguments, _pretrain_arguments, _demo_arguments)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=(
        "Tune Swin detectors and UPerNet with E3VA, LoRand or the papers' baselines: train, sweep, compare, "
        "then evaluate, predict and serve what was trained."))
    commands = parser.add_subparsers(dest="command", required=True)
    for add_arguments in COMMANDS:
        add_arguments(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from orchestrator.console import CONSOLE, log_tail
        from orchestrator.run import RunFailedError
        if not isinstance(exc, RunFailedError):
            raise
        if CONSOLE.log_path is not None:  # what led to it, from the log the terminal did not show
            print(f"the last lines of {CONSOLE.log_path}:\n{log_tail(CONSOLE.log_path)}", file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
