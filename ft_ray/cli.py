"""`ft-ray`: the command line, and the one entry-point layer.

Every command is a module with `add_arguments(parser)` and `run(args) -> exit status` (its
docstring is its --help). `ft-ray <command>` and `python -m jobs.<command>` (the `ray job submit`
entry points, each one call of `run_command`) parse the same arguments and run the same function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module, one-line help)
COMMANDS = (
    ("data", "ft_ray.data.cli", "write token shards (synthetic tasks, real corpora)"),
    ("train", "ft_ray.train.cli", "train one model on Ray Train"),
    ("compare", "ft_ray.compare", "baseline vs Free Transformers at several kappa, with a report"),
    ("sweep", "ft_ray.tune.runner", "Ray Tune sweep over latent bits, free bits, seeds"),
    ("eval", "ft_ray.eval.cli", "lm-eval tasks over bundles and plan seeds on Ray, with a report"),
    ("serve", "ft_ray.serve.cli", "serve model bundles over HTTP with Ray Serve"),
    ("export", "ft_ray.export.cli", "export a bundle (hf: a Hugging Face transformers model)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ft-ray", description="Free Transformer language models on Ray")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def run_command(command: str, argv: list[str] | None = None) -> int:
    """`ft-ray <command> ARGS`, ARGS from the command line by default: a `jobs/` entry point."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
