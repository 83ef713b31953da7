"""The ``imgclf`` command: the trainer's commands plus compiling and running the pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipelines import operations
from trainer import cli as trainer_cli


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines import compiler
    from pipelines.cluster import ClusterSettings

    try:
        settings = ClusterSettings.from_options(
            node_selector=args.gpu_node_selector, tolerations=args.gpu_toleration, gcs_secret=args.gcs_secret,
            shm_size=args.shm_size, resources=args.resources, env=args.env, min_backend=args.min_backend,
            gpus=args.gpus)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return trainer_cli.EXIT_USAGE
    committed = compiler.COMMITTED.get(args.min_backend)
    if committed is None and not args.output:
        print(f"error: --min-backend {args.min_backend}: give --output; the committed YAMLs are for "
              f"{' and '.join(compiler.COMMITTED)}", file=sys.stderr)
        return trainer_cli.EXIT_USAGE
    path = compiler.compile_pipeline(args.output or committed[0], image=args.image, settings=settings)
    print(f"compiled pipeline written to {path}")
    # Both committed pipelines by default; with --output only the one asked for, unless --tuning-output too.
    if args.tuning_output or not args.output:
        path = compiler.compile_tuning_pipeline(args.tuning_output or committed[1],
                                                image=args.image, settings=settings)
        print(f"compiled tuning pipeline written to {path}")
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    from pipelines.local import run_local
    from trainer.hyperparameters import FIELDS, Hyperparameters

    # The same parameters a cluster run takes (`imgclf submit`): hyperparameters and pipeline settings.
    values = operations.pipeline_parameters({**operations.load_parameters(args.params, args.assignments),
                                             "data_uri": args.data})
    hp = Hyperparameters.from_mapping({name: value for name, value in values.items() if name in FIELDS})
    settings = {name: value for name, value in values.items() if name not in FIELDS and name != "data_uri"}
    _print_start("pipeline", args.output)
    summary = run_local(args.data, args.output, hp, runner=args.runner, image=args.image, pipeline_args=settings,
                        cache_dir=args.cache, verbose=args.verbose)
    if summary["status"] != "succeeded":
        _print_failure("pipeline", summary, f"{args.output}/summary.json")
        return 1
    counts = ", ".join(f"{split} {count}" for split, count in summary["counts"].items())
    print(f"\npipeline succeeded in {summary['pipeline_seconds']:.0f} s: {summary['eval_metric']} = "
          f"{summary['eval_value']:.4f} on the test split")
    print(f"images: {counts}; rejected {summary['rejected']}, skipped {summary['skipped']}")
    print(summary["blessing"])
    if args.cache:
        reused = ", ".join(summary["steps_reused"]) or "none (nothing matched an earlier run)"
        print(f"reused from the cache in {args.cache}: {reused}")
    print(f"model: {summary['model_path']}")
    print(f"run page: {summary['run_page']} (steps, parameters, reports); summary: {args.output}/summary.json")
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from pipelines.tuning import image_classification_tuning
    from pipelines.tuning_local import BEST_FILE, TUNING_FILE, run_tuning_local
    from trainer.tune import search_space

    values = {**operations.load_parameters(args.params, args.assignments), "data_uri": args.data}
    if args.ranges:
        values["ranges"] = search_space.load_ranges_file(args.ranges).to_json()
    for name in ("objective", "strategy", "max_trials", "parallel_trials", "early_stopping_type"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    # The same check a cluster run gets (`imgclf submit --tuning`): hyperparameters, settings and the search.
    typed = operations.pipeline_parameters(values, image_classification_tuning)
    _print_start("tuning pipeline", args.output)
    summary = run_tuning_local(args.data, args.output, {k: v for k, v in typed.items() if k != "data_uri"},
                               verbose=args.verbose)
    if summary["status"] != "succeeded":
        trials = [f"  - trial {trial['trial']}: {trial['status']}" + (f" ({trial['error']})" if trial["error"] else "")
                  for trial in summary.get("trials", [])]
        _print_failure("tuning", summary, f"{args.output}/{TUNING_FILE}", trials)
        return 1
    best, evaluation = summary["best"], summary["evaluation"]
    counts: dict[str, int] = {}
    for trial in summary["trials"]:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    print(f"\ntuning succeeded in {summary['pipeline_seconds']:.0f} s: {len(summary['trials'])} trials ("
          + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")")
    print(f"best: trial {best['trial']}, {summary['objective']} = {best['value']:.4f}; tuned: "
          + ", ".join(f"{k}={best['hyperparameters'][k]!r}" for k in summary["tuned"]))
    print(f"best model on the test split: {evaluation['eval_metric']} = {evaluation['eval_value']:.4f}; "
          f"{evaluation['blessing']}")
    print(f"trials report: {summary['report_html']}")
    print(f"run page: {summary['run_page']} (steps, parameters, reports); written: {args.output}/{TUNING_FILE}, "
          f"{args.output}/{BEST_FILE}")
    return 0


def _print_start(what: str, output: str) -> None:
    from trainer.layout import STEP_LOG_FILE

    print(f"running the {what} on this machine: a line per step; each step's whole log is {STEP_LOG_FILE} "
          f"beside its artifacts under {output}/artifacts (--verbose shows it here)", flush=True)


def _print_failure(what: str, summary: dict, written: str, details: Sequence[str] = ()) -> None:
    """The failed step and the run page, then the step's reason, the last lines of its log and the log's path."""
    out = sys.stderr
    print(f"\n{what} failed in step '{summary['failed_step']}' after {summary['pipeline_seconds']:.0f} s", file=out)
    for line in details:
        print(line, file=out)
    print(f"run page: {summary.get('run_page')}; summary: {written}", file=out)
    print(f"reason: {summary['error']}", file=out)
    if summary.get("log_tail"):
        print(f"last {len(summary['log_tail'])} lines of the step's log:", file=out)
        for line in summary["log_tail"]:
            print(f"  | {line}", file=out)
    if summary.get("failed_log"):
        print(f"log: {summary['failed_log']}", file=out)


def _cmd_katib_experiment(args: argparse.Namespace) -> int:
    import yaml

    from components._image import IMAGE
    from trainer import hyperparameters as hps
    from trainer.tune import katib, search_space, tuning

    given = hps.merge_sources(args.params, args.assignments)
    # Without --ranges: the recommended ranges less the hyperparameters given a value.
    ranges = search_space.load_ranges_file(args.ranges).to_sagemaker() if args.ranges else ""
    settings = {name: getattr(args, name) for name in ("objective", "strategy", "max_trials", "parallel_trials",
                                                      "early_stopping_type") if getattr(args, name) is not None}
    config = tuning.make_config(ranges, given, fixed_given=given, **settings)
    manifest = katib.experiment_manifest(config, args.dataset, name=args.name, namespace=args.namespace,
                                         image=args.image or IMAGE, gpus=args.gpus)
    for note in katib.notes(config):
        print(f"note: {note}", file=sys.stderr)
    with open(args.output, "w", encoding="utf-8") as handle:
        yaml.safe_dump(manifest, handle, sort_keys=False)
    print(f"Katib Experiment {args.name!r} written to {args.output}: {config.strategy} "
          f"({manifest['spec']['algorithm']['algorithmName']}) over {', '.join(config.space.names)}, "
          f"{config.n_trials} trials, {config.lanes} at a time; apply it with kubectl apply -f {args.output}")
    return 0


VERBOSE_HELP = "print every line each step logs, as it comes (it is always in the step's log file)"


def build_parser() -> argparse.ArgumentParser:
    parser, commands = trainer_cli.build_parser(prog="imgclf")

    cmd = commands.add_parser("compile", help="compile the pipeline to YAML")
    cmd.add_argument("--output", help="where to write it (default: the committed pipelines/image_classification.yaml)")
    cmd.add_argument("--tuning-output", help="where to write the tuning pipeline (default: the committed "
                                             "pipelines/image_classification_tuning.yaml, unless --output is given)")
    cmd.add_argument("--image", help="component image to use instead of the project's, e.g. registry.example/imgclf:1")
    from pipelines.backends import BACKENDS, DEFAULT_BACKEND

    cmd.add_argument("--min-backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                     help="oldest Kubeflow Pipelines backend the YAML must run on (default %(default)s, what the "
                          "committed YAMLs target): 2.2.0 (Kubeflow 1.9) fixes the GPU count at compile time "
                          "and has no /dev/shm mount; 2.14.0 adds the steps' display names; see the README")
    cmd.add_argument("--gpus", type=int, metavar="N",
                     help="with --min-backend 2.2.0: the GPUs of training and of each tuning lane (default 1); "
                          "that backend cannot read the run form's accelerator_count")
    cluster = cmd.add_argument_group("cluster settings (see README)")
    cluster.add_argument("--gpu-node-selector", action="append", default=[], metavar="LABEL=VALUE",
                         help="node label the training pod requires, e.g. cloud.google.com/gke-accelerator=nvidia-l4")
    cluster.add_argument("--gpu-toleration", action="append", metavar="KEY[=VALUE]:EFFECT",
                         help="taint the training pod tolerates (default nvidia.com/gpu:NoSchedule); repeatable")
    cluster.add_argument("--gcs-secret", default="", metavar="SECRET",
                         help="Kubernetes secret with a service-account key.json mounted by every step "
                              "(leave out with Workload Identity)")
    cluster.add_argument("--shm-size", metavar="SIZE",
                         help="size of /dev/shm for the training pod (default 16Gi; none for --min-backend 2.2.0)")
    cluster.add_argument("--resources", action="append", default=[], metavar="STEP=CPU,MEMORY",
                         help="CPU and memory request of a step (validate, convert, train, evaluate)")
    cluster.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                         help="environment variable set on every step, e.g. STORAGE_EMULATOR_HOST for tests")
    cmd.set_defaults(func=_cmd_compile)

    cmd = commands.add_parser("run-local", help="run the whole compiled pipeline on this machine (kfp.local)")
    cmd.add_argument("--data", required=True, help="local path or gs:// URI of the class folders")
    cmd.add_argument("--output", required=True, help="folder for the artifacts and summary.json")
    cmd.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                     help="subprocess: steps run in this Python environment; docker: in the component "
                          "image, as a non-root user without network (needs a Docker engine)")
    cmd.add_argument("--image", help="component image for --runner docker (default: the project's)")
    cmd.add_argument("--cache", metavar="DIR",
                     help="reuse steps from earlier runs with this cache folder: on unchanged data and "
                          "parameters, validation, conversion, training and evaluation are taken from the "
                          "cache; the look at the data, the gate and the push run every time")
    cmd.add_argument("--json", action="store_true", help="also print the whole summary")
    cmd.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    trainer_cli.add_hyperparameter_arguments(cmd, settings=True)
    cmd.set_defaults(func=_cmd_run_local)

    cmd = commands.add_parser("tune", help="search hyperparameters with the tuning pipeline on this machine "
                                            "(kfp.local); writes tuning.json and best_hyperparameters.yaml")
    cmd.add_argument("--data", required=True, help="local path or gs:// URI of the class folders")
    cmd.add_argument("--output", required=True, help="folder for the artifacts, tuning.json and "
                                                     "best_hyperparameters.yaml")
    cmd.add_argument("--ranges", metavar="FILE", help="SageMaker ParameterRanges JSON or our YAML form "
                                                      "(default: the reference's recommended ranges)")
    cmd.add_argument("--objective", help="validation:accuracy (default), validation:loss; in binary mode also "
                                         "validation:precision, validation:recall, validation:auc, validation:prc")
    cmd.add_argument("--strategy", help="Bayesian (default), Random, Grid or Hyperband")
    cmd.add_argument("--max-trials", type=int, help="trials in all (default 10)")
    cmd.add_argument("--parallel-trials", type=int, help="trials at a time (default 2)")
    cmd.add_argument("--early-stopping-type", help="Auto (default): stop trials worse than the median of the others "
                                                   "at the same epoch; Off")
    cmd.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    trainer_cli.add_hyperparameter_arguments(cmd, settings=True)
    cmd.set_defaults(func=_cmd_tune)
    search_options = [a for a in cmd._actions if a.dest in ("ranges", "objective", "strategy", "max_trials",
                                                                "parallel_trials", "early_stopping_type")]

    cmd = commands.add_parser("katib-experiment", help="write the same search as a Katib Experiment (YAML) for "
                                                        "clusters that run Katib")
    cmd.add_argument("--dataset", required=True, help="an already converted data set (gs:// URI or a path the "
                                                      "trial pods mount), e.g. a tuning or training run's dataset")
    cmd.add_argument("--output", required=True, help="YAML file to write")
    cmd.add_argument("--name", default="imgclf-tuning", help="the Experiment's name (default: %(default)s)")
    cmd.add_argument("--namespace", default="kubeflow", help="its namespace (default: %(default)s)")
    cmd.add_argument("--image", help="trial image (default: the project's)")
    cmd.add_argument("--gpus", type=int, default=1, help="GPUs per trial (default: %(default)s)")
    for action in search_options:
        cmd._add_action(action)
    trainer_cli.add_hyperparameter_arguments(cmd)
    cmd.set_defaults(func=_cmd_katib_experiment)

    operations.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return trainer_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
