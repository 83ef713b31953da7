"""Command line of the trainer library: each pipeline step, and prediction, runnable on its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from trainer import hyperparameters as hps
from trainer import logs
from trainer.errors import HyperparameterError, ImgclfError

EXIT_USAGE = 2


def add_hyperparameter_arguments(parser: argparse.ArgumentParser, *, flags: bool = False,
                                 settings: bool = False) -> None:
    """--params FILE and --set name=value; with ``flags``, also one --NAME option per hyperparameter.

    ``settings`` says that the pipeline's own settings (e.g. min_eval_value) are accepted too.
    """
    group = parser.add_argument_group("hyperparameters" + (" and pipeline settings" if settings else ""))
    group.add_argument("--params", action="append", default=[], metavar="FILE",
                       help="YAML or JSON file of hyperparameters (SageMaker's all-string "
                            "hyperparameters.json works as it is); may be repeated, later files win")
    group.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE",
                       help="one hyperparameter, e.g. --set learning_rate=0.01; wins over --params")
    if flags:
        for name, field in hps.FIELDS.items():
            # Values stay strings here: the schema converts and checks them, as it does for files.
            group.add_argument(f"--{name}", dest=f"hp_{name}", metavar="VALUE",
                               help=f"{field.metadata['help']} Valid: {hps.describe_valid(field)}.")
        for alias, name in hps.ALIASES.items():
            group.add_argument(f"--{alias}", dest=f"hp_{alias}", metavar="VALUE", help=f"alias of --{name}")


def resolve_hyperparameters(args: argparse.Namespace) -> hps.Hyperparameters:
    """Defaults, then --params files, then --set, then per-name flags."""
    assignments = list(args.assignments)
    for key, value in vars(args).items():
        if key.startswith("hp_") and value is not None:
            assignments.append(f"{key[3:]}={value}")
    return hps.Hyperparameters.resolve(files=args.params, assignments=assignments)


def _cmd_hyperparameters(args: argparse.Namespace) -> int:
    if args.markdown:
        print(hps.markdown_table())
        return 0
    if args.list:
        for name, field in hps.FIELDS.items():
            print(f"{name} ({hps.python_type(field).__name__}, default {field.default!r}): "
                  f"{field.metadata['help']} Valid: {hps.describe_valid(field)}.")
        return 0
    print(resolve_hyperparameters(args).to_yaml(), end="")
    return 0


def _cmd_validate_data(args: argparse.Namespace) -> int:
    from trainer.data.validation import validate_dataset

    result = validate_dataset(args.data, args.output, binary_mode=args.binary_mode,
                              max_rejected_fraction=args.max_rejected_fraction)
    counts = result["counts"]
    print(f"{len(result['classes'])} classes, {counts['accepted']} images accepted, "
          f"{counts['rejected']} rejected, {counts['skipped']} skipped; "
          f"details in {args.output}/validation.json and the lists beside it")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from trainer.data.conversion import convert_dataset

    hp = resolve_hyperparameters(args)
    manifest = convert_dataset(args.data, args.validation, args.output,
                               validation_split_ratio=hp.validation_split_ratio,
                               test_split_ratio=hp.test_split_ratio, random_seed=hp.random_seed)
    print(json.dumps({split: info["count"] for split, info in manifest["splits"].items()}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.train.training import train

    hp = resolve_hyperparameters(args)
    result = train(hp, args.dataset, args.output, initial_model_dir=args.initial_model,
                   backup_dir=args.backup_dir, jit_compile=args.jit_compile)
    print(json.dumps({"epochs_completed": result["epochs_completed"], "model_dir": args.output}))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate.evaluation import evaluate

    result = evaluate(args.model, args.dataset, args.output, eval_metric=args.eval_metric)
    print(json.dumps({"eval_metric": result["eval_metric"], "eval_value": result["eval_value"]}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from trainer.serve.prediction import predict

    for answer in predict(args.model, args.images, verbose=args.verbose, engine=args.engine):
        print(json.dumps(answer))
    return 0


def _cmd_batch_predict(args: argparse.Namespace) -> int:
    from trainer.serve.prediction import batch_predict

    result = batch_predict(args.model, args.data, args.output)
    print(json.dumps(result))
    if result["errors"]:
        print(f"warning: {result['errors']} of {result['images']} images could not be read; their lines in "
              f"{args.output} hold an \"error\" instead of probabilities", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from trainer.serve.serving import ServerOptions, serve

    serve(args.model, ServerOptions(host=args.host, port=args.port, name=args.name, max_batch=args.max_batch,
                                    batch_wait_ms=args.batch_wait_ms, max_request_bytes=args.max_request_bytes,
                                    max_pixels=args.max_pixels))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from trainer.serve.registry import push_model

    # By hand there is no gate decision to record; blessing.json says so instead of leaving it blank.
    print(push_model(args.model, args.registry,
                     metadata={"reason": "pushed by hand with the push command; no quality gate was applied"}))
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from trainer.data.demo_data import write_digits

    counts = write_digits(args.output)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} class folders under {args.output}")
    return 0


def build_parser(prog: str = "python -m trainer") -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Image classification with transfer learning: SageMaker's Image Classification - TensorFlow "
        "algorithm, step by step."))
    parser.add_argument("-v", "--verbose-logs", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmd = commands.add_parser("hyperparameters", help="print the resolved hyperparameters as YAML, or the problems")
    add_hyperparameter_arguments(cmd)
    cmd.add_argument("--list", action="store_true", help="describe every hyperparameter")
    cmd.add_argument("--markdown", action="store_true", help="print the docs table of every hyperparameter")
    cmd.set_defaults(func=_cmd_hyperparameters)

    cmd = commands.add_parser("validate-data", help="check a class-folder data set and write validation.json")
    cmd.add_argument("--data", required=True, help="local path or gs:// URI of the class folders")
    cmd.add_argument("--output", required=True, help="folder for validation.json and report.md")
    cmd.add_argument("--binary-mode", action="store_true", help="require exactly two classes")
    cmd.add_argument("--max-rejected-fraction", type=float, default=0.01,
                     help="largest share of unusable files tolerated (default 0.01)")
    cmd.set_defaults(func=_cmd_validate_data)

    cmd = commands.add_parser("convert", help="split validated images and write TFRecord shards")
    cmd.add_argument("--data", required=True)
    cmd.add_argument("--validation", required=True, help="validation.json written by validate-data")
    cmd.add_argument("--output", required=True)
    add_hyperparameter_arguments(cmd)
    cmd.set_defaults(func=_cmd_convert)

    cmd = commands.add_parser("train", help="train on a converted data set and export the model")
    cmd.add_argument("--dataset", required=True, help="folder written by convert")
    cmd.add_argument("--output", required=True, help="model folder to write")
    cmd.add_argument("--initial-model", help="earlier model folder to continue from (incremental training)")
    cmd.add_argument("--backup-dir", help="durable folder for per-epoch backups (resume after preemption)")
    cmd.add_argument("--jit-compile", action="store_true", help="compile the training step with XLA")
    add_hyperparameter_arguments(cmd, flags=True)
    cmd.set_defaults(func=_cmd_train)

    cmd = commands.add_parser("evaluate", help="evaluate a model on a converted data set's test split")
    cmd.add_argument("--model", required=True)
    cmd.add_argument("--dataset", required=True)
    cmd.add_argument("--output", required=True)
    cmd.add_argument("--eval-metric", help="headline metric (default: the model's eval_metric)")
    cmd.set_defaults(func=_cmd_evaluate)

    cmd = commands.add_parser("predict", help="classify images; prints the reference algorithm's JSON per image")
    cmd.add_argument("--model", required=True, help="model folder (local or gs://)")
    cmd.add_argument("--verbose", action="store_true", help="add labels and predicted_label (application/json;verbose)")
    cmd.add_argument("--engine", choices=("keras", "tflite", "tflite_dynamic_range"), default="keras",
                     help="run model.keras, model.tflite or model_dynamic_range.tflite")
    cmd.add_argument("images", nargs="+", help="jpg, jpeg or png files (local or gs://)")
    cmd.set_defaults(func=_cmd_predict)

    cmd = commands.add_parser("batch-predict", help="classify every image in a folder; one JSON line per image")
    cmd.add_argument("--model", required=True, help="model folder (local or gs://)")
    cmd.add_argument("--data", required=True, help="folder of jpg, jpeg or png files, searched recursively")
    cmd.add_argument("--output", required=True, help="JSON Lines file to write (local or gs://)")
    cmd.set_defaults(func=_cmd_batch_predict)

    cmd = commands.add_parser("push", help="copy a model folder into a new version of a model registry; "
                                           "prints the version's URI")
    cmd.add_argument("--model", required=True, help="model folder written by training (local or gs://)")
    cmd.add_argument("--registry", required=True, help="registry root (local or gs://); created by the first push")
    cmd.set_defaults(func=_cmd_push)

    from trainer.serve import serving  # light: kserve and TensorFlow load when the server starts

    defaults = serving.ServerOptions()
    cmd = commands.add_parser("serve", help="serve a model folder or registry version over HTTP: TF Serving REST "
                                            "(V1), SageMaker's /invocations and /ping, Open Inference Protocol V2")
    cmd.add_argument("model", metavar="MODEL_URI", help="model folder or registry version (path, volume or gs://)")
    cmd.add_argument("--host", default=defaults.host,
                     help="address to listen on (default %(default)s; 0.0.0.0 in a container)")
    cmd.add_argument("--port", type=int, default=defaults.port, help="HTTP port (default %(default)s)")
    cmd.add_argument("--name", default=defaults.name,
                     help="model name in /v1/models/NAME:predict and /v2/models/NAME/infer (default %(default)s)")
    cmd.add_argument("--max-batch", type=int, default=defaults.max_batch,
                     help="most images of concurrent requests classified in one model call (default %(default)s)")
    cmd.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                     help="longest a batch waits for requests already arriving (default %(default)s)")
    cmd.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                     help="largest request body accepted; larger ones get 413 (default %(default)s)")
    cmd.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                     help="largest image (width x height) accepted; larger ones get 400 (default %(default)s)")
    cmd.set_defaults(func=_cmd_serve)

    cmd = commands.add_parser("demo-data", help="write scikit-learn's handwritten digits as class folders of PNGs")
    cmd.add_argument("--output", required=True)
    cmd.set_defaults(func=_cmd_demo_data)
    return parser, commands


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run the command, and turn our errors into a message and an exit status."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose_logs else logging.INFO, format=logs.FORMAT)
    try:
        return args.func(args)
    except HyperparameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ImgclfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser, argv)
