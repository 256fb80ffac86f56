"""Command line: ``python -m unlearning_losses demo`` and ``... task-vector``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import NoReturn

import torch

from . import __version__, bench
from .demo import arguments as demo_arguments

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="unlearning-losses", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_arguments.add_arguments(
        commands.add_parser("demo", help="train a small model, unlearn, compare the methods")
    )
    bench.add_arguments(
        commands.add_parser(
            "bench",
            help="time the losses against eager PyTorch and kernels, or a training step (--step)",
        )
    )
    vector = commands.add_parser(
        "task-vector",
        help="write base - alpha * (finetuned - base) from two checkpoint folders",
    )
    vector.add_argument("--base", type=Path, required=True, help="the model to clean")
    vector.add_argument(
        "--finetuned",
        type=Path,
        required=True,
        help="that model fine-tuned further on the forget set",
    )
    vector.add_argument("--alpha", type=float, required=True, help="the step (MUSE uses 5)")
    vector.add_argument("--out", type=Path, required=True)
    vector.add_argument("--max-shard-size", default="5GB")
    vector.add_argument("--out-dtype", choices=sorted(DTYPES))
    vector.add_argument("--allow-dtype-mismatch", action="store_true")
    vector.add_argument("--overwrite", action="store_true")
    vector.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "bench":
        # Without --step, each row is checked against the registry's float64 reference, whose
        # package (unlearning_losses.testing) needs Hypothesis; --step builds Hugging Face models.
        _require(parser, "bench", ("transformers",) if args.step else ("hypothesis",))
        if args.out:
            _require(parser, "bench", ("matplotlib",))
        try:
            settings = bench.check_arguments(args)
        except ValueError as error:
            _user_error(parser, "bench", error)
        bench.run(settings)
    elif args.command == "demo":
        _require(parser, "demo", ("matplotlib", "tqdm"))
        from .demo import run as demo

        demo.run(args)
    else:
        from .checkpoint import negate_task_vector_checkpoint

        try:
            report = negate_task_vector_checkpoint(
                args.base,
                args.finetuned,
                args.out,
                args.alpha,
                max_shard_size=args.max_shard_size,
                out_dtype=DTYPES.get(args.out_dtype),
                allow_dtype_mismatch=args.allow_dtype_mismatch,
                overwrite=args.overwrite,
                progress=not args.quiet,
            )
        except (ValueError, TypeError) as error:
            _user_error(parser, "task-vector", error)
        print(f"wrote {args.out}: {report.summary()}")


def _user_error(parser: argparse.ArgumentParser, command: str, error: Exception) -> NoReturn:
    """The user's input was wrong: one line and exit 2, no traceback."""
    print(f"{parser.prog} {command}: error: {error}", file=sys.stderr)
    sys.exit(2)


def _require(parser: argparse.ArgumentParser, extra: str, modules: tuple[str, ...]) -> None:
    """Exit with one line naming the install that brings what a command needs."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"{parser.prog} {extra}: needs {', '.join(missing)}: "
            f'pip install "unlearning_losses[{extra}]"',
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
