"""The demo command's arguments, importable without the demo's own dependencies."""

from __future__ import annotations

import argparse
from pathlib import Path

from .methods import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        metavar="METHOD",
        help=f"any of: {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="unlearning steps per method, and of the fine-tune on the forget set that the task "
        "vector, WHP and RKLD share",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=50)
    parser.add_argument("--forget-people", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=600, help="at most")
    parser.add_argument("--lr", type=float, default=1e-3, help="unlearning learning rate")
    parser.add_argument("--retain-batch", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1.0, help="task-vector step")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
