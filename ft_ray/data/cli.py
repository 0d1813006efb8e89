"""`ft-ray data synthetic|corpus`: write token shards from the command line.

    ft-ray data synthetic [--task letters|modes] [--num-sequences N] [--seed S] --out DIR [--overwrite]
    ft-ray data corpus --source stdlib|<glob>|hf:<name>[:<config>]|<dir> [--column text]
                       --tokenizer bytes|bpe:<size>|<path> --seq-len N [--val-fraction F]
                       [--shard-mb M] --out DIR [--overwrite]

Bad input ends with one line on stderr and exit status 2, never a traceback. The output
directory is checked first (a non-empty one needs --overwrite), so a refused run costs nothing,
and it is replaced only by a complete shard set: a failed run leaves it as it was.
"""

from __future__ import annotations

import argparse
import sys

from ft_ray.data.errors import DataError

EXIT_BAD_INPUT = 2


def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    from ft_ray.data.synthetic import TASKS

    p = sub.add_parser("synthetic", help="write a synthetic task's sequences as shards",
                       description="Write train and validation shards of a synthetic task.")
    p.add_argument("--task", default="letters", choices=sorted(TASKS), help="(default: letters)")
    p.add_argument("--num-sequences", type=int, default=100_000,
                   help="train sequences; validation adds num * val-fraction (default: 100000)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="(default: 0.05)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size bound (default: 64)")
    _add_out(p)


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shard set already in --out (never other files)")


def _add_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="tokenize real text or code into packed shards",
                       description="Tokenize a corpus, split it by document hash and pack it "
                                   "into rows of seq_len + 1 tokens.")
    p.add_argument("--source", default="stdlib",
                   help="stdlib | <glob> | hf:<name>[:<config>] | <dir> (default: stdlib)")
    p.add_argument("--column", default="text", help="text column of table sources (default: text)")
    p.add_argument("--tokenizer", required=True, help="bytes | bpe:<vocab size> | <tokenizer.json>")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training input")
    p.add_argument("--val-fraction", type=float, default=0.01, help="(default: 0.01)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size bound (default: 64)")
    _add_out(p)


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data synthetic` and `data corpus` under a top-level CLI's subparsers."""
    data = subparsers.add_parser("data", help="write token shards (synthetic tasks, real corpora)")
    sub = data.add_subparsers(dest="data_command", metavar="{synthetic,corpus}", required=True)
    _add_synthetic(sub)
    _add_corpus(sub)
    data.set_defaults(func=run_data)
    return data


def _shard_bytes(shard_mb: float) -> int:
    if shard_mb <= 0:
        raise DataError(f"--shard-mb must be > 0, got {shard_mb}")
    return max(1, int(shard_mb * (1 << 20)))


def _run_synthetic(args: argparse.Namespace) -> None:
    from ft_ray.data.shards import write_synthetic_shards

    write_synthetic_shards(args.task, args.num_sequences, args.seed, args.out,
                           val_fraction=args.val_fraction, shard_max_bytes=_shard_bytes(args.shard_mb),
                           overwrite=args.overwrite)


def _run_corpus(args: argparse.Namespace) -> None:
    from ft_ray.data.shards import check_out_dir, write_corpus_shards
    from ft_ray.data.sources import iter_documents
    from ft_ray.data.tokenizer import load_tokenizer

    check_out_dir(args.out, args.overwrite)  # a refused --out costs no BPE training or tokenizing
    iter_documents(args.source, args.column)  # an unknown source fails before BPE training

    def texts():
        return (doc.text for doc in iter_documents(args.source, args.column))

    if args.tokenizer.startswith("bpe:"):
        print(f"training {args.tokenizer} on {args.source} ...", flush=True)
    # a tokenizer.json is read whole here, so it may live in the --out it will be replaced in
    tok = load_tokenizer(args.tokenizer, texts)
    write_corpus_shards(iter_documents(args.source, args.column), tok, args.seq_len, args.out,
                        val_fraction=args.val_fraction, shard_max_bytes=_shard_bytes(args.shard_mb),
                        progress=lambda line: print(line, flush=True), source=args.source,
                        tokenizer_spec=args.tokenizer, overwrite=args.overwrite)


def run_data(args: argparse.Namespace) -> int:
    """Run one `data` command; bad input -> one line on stderr and EXIT_BAD_INPUT."""
    try:
        if args.data_command == "synthetic":
            _run_synthetic(args)
        else:
            _run_corpus(args)
    except (DataError, OSError) as e:
        print(f"ft-ray data {args.data_command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ft_ray.data.cli synthetic ...`: the data commands without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="ft-ray")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
