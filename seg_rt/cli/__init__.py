"""The ``seg-rt`` command line (console script ``seg_rt.cli:main``): one module per sub-command, each
with its ``add_parser``; ``common`` holds the shared flags and the error handling. Errors in what the
user passed end in one line and exit code 2."""

from __future__ import annotations

from collections.abc import Sequence

from . import bench, export, generate, run, serve, submit, video
from .common import Parser
from .common import run as run_command

COMMANDS = (generate, video, export, run, submit, serve, bench)  # in --help's order


def build_parser() -> Parser:
    parser = Parser(prog="seg-rt", description="Smoothed Energy Guidance for diffusers models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
