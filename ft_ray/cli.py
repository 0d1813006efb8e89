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
    from ft_ray import compare

    cmp = sub.add_parser("compare", help="baseline vs Free Transformers at several kappa, with a report",
                         description=compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_arguments(cmp)
    cmp.set_defaults(func=compare.run)
    from ft_ray.tune import runner

    sweep = sub.add_parser("sweep", help="Ray Tune sweep over latent bits, free bits, seeds",
                           description=runner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(sweep)
    sweep.set_defaults(func=runner.run)
    from ft_ray.eval import cli as eval_cli

    ev = sub.add_parser("eval", help="lm-eval tasks over bundles and plan seeds on Ray, with a report",
                        description=eval_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_cli.add_arguments(ev)
    ev.set_defaults(func=eval_cli.run)
    from ft_ray.serve import cli as serve_cli

    srv = sub.add_parser("serve", help="serve model bundles over HTTP with Ray Serve", description=serve_cli.__doc__)
    serve_cli.add_arguments(srv)
    srv.set_defaults(func=serve_cli.run)
    from ft_ray.export import cli as export_cli

    exp = sub.add_parser("export", help="export a bundle (hf: a Hugging Face transformers model)")
    export_cli.add_arguments(exp)
    exp.set_defaults(func=export_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
