"""`ft-ray`: the command line. Each command group registers itself from its own module."""

from __future__ import annotations

import argparse
import sys

from ft_ray.data.cli import add_data_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ft-ray", description="Free Transformer language models on Ray")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data_commands(sub)
    from ft_ray.train import cli as train_cli

    train = sub.add_parser("train", help="train one model on Ray Train", description=train_cli.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train_cli.add_arguments(train)
    train.set_defaults(func=train_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
