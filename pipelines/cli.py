"""The ``imgclf`` command: the trainer's commands plus compiling and running the pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipelines import operations
from trainer import cli as trainer_cli


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.compiler import compile_pipeline

    path = compile_pipeline(args.output, image=args.image) if args.output else compile_pipeline(image=args.image)
    print(f"compiled pipeline written to {path}")
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    from pipelines.local import run_local

    hp = trainer_cli.resolve_hyperparameters(args)
    summary = run_local(args.data, args.output, hp, runner=args.runner, image=args.image,
                        pipeline_args={"max_rejected_fraction": args.max_rejected_fraction})
    if summary["status"] != "succeeded":
        print(f"\npipeline failed in step '{summary['failed_step']}': {summary['error']}", file=sys.stderr)
        print(f"summary: {args.output}/summary.json", file=sys.stderr)
        return 1
    counts = ", ".join(f"{split} {count}" for split, count in summary["counts"].items())
    print(f"\npipeline succeeded in {summary['pipeline_seconds']:.0f} s: {summary['eval_metric']} = "
          f"{summary['eval_value']:.4f} on the test split")
    print(f"images: {counts}; rejected {summary['rejected']}, skipped {summary['skipped']}")
    print(f"model: {summary['model_path']}")
    print(f"summary: {args.output}/summary.json")
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, commands = trainer_cli.build_parser(prog="imgclf")

    cmd = commands.add_parser("compile", help="compile the pipeline to YAML")
    cmd.add_argument("--output", help="where to write it (default: the committed pipelines/image_classification.yaml)")
    cmd.add_argument("--image", help="component image to use instead of the project's, e.g. registry.example/imgclf:1")
    cmd.set_defaults(func=_cmd_compile)

    cmd = commands.add_parser("run-local", help="run the whole compiled pipeline on this machine (kfp.local)")
    cmd.add_argument("--data", required=True, help="local path or gs:// URI of the class folders")
    cmd.add_argument("--output", required=True, help="folder for the artifacts and summary.json")
    cmd.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                     help="subprocess: steps run in this Python environment; docker: in the component "
                          "image, as a non-root user without network (needs a Docker engine)")
    cmd.add_argument("--image", help="component image for --runner docker (default: the project's)")
    cmd.add_argument("--max-rejected-fraction", type=float, default=0.01,
                     help="largest share of unusable files tolerated (default 0.01)")
    cmd.add_argument("--json", action="store_true", help="also print the whole summary")
    trainer_cli.add_hyperparameter_arguments(cmd)
    cmd.set_defaults(func=_cmd_run_local)

    operations.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return trainer_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
