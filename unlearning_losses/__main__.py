"""Command line: ``python -m unlearning_losses demo [options]``."""

from __future__ import annotations

import argparse

from .demo import run as demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="unlearning-losses", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train a small model, unlearn, compare methods")
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(args)


if __name__ == "__main__":
    main()
