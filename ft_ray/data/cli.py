"""`ft-ray data synthetic|corpus`: write token shards from the command line.

    ft-ray data synthetic [--task letters|modes] [--num-sequences N] [--seed S] --out DIR [--overwrite]
    ft-ray data corpus --source stdlib|<glob>|hf:<name>[:<config>]|<dir> [--column text]
                       --tokenizer bytes|bpe:<size>|<path> --seq-len N [--val-fraction F]
                       [--shard-mb M] [--buckets B|auto] [--bpe-sample-docs K] [--seed S]
                       [--max-doc-mb M] [--ray | --workers N] --out DIR [--overwrite]

Bad input ends with one line on stderr and exit status 2, never a traceback. The output
directory is checked first (a non-empty one needs --overwrite), so a refused run costs nothing,
and it is replaced only by a complete shard set: a failed run leaves it as it was.

`corpus` runs in this process, or with --ray / --workers N as a Ray Data job (ft_ray/data/
prepare.py) that writes the same shards; an interrupted Ray run resumes when run again.
"""

from __future__ import annotations

import argparse
import sys

from ft_ray.data.errors import DataError
from ft_ray.entrypoint import EXIT_BAD_INPUT


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
    from ft_ray.data.corpus_plan import DEFAULT_BPE_SAMPLE_DOCS, DEFAULT_MAX_DOC_MB

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
    p.add_argument("--buckets", default="auto",
                   help="document buckets, each packed into its own shards (train-<bucket>-<k>); "
                        "auto: one per GiB of source, 1 below that and for hf: (default: auto)")
    p.add_argument("--bpe-sample-docs", type=int, default=DEFAULT_BPE_SAMPLE_DOCS,
                   help="bpe:<size> is trained on at most this many documents, drawn with --seed "
                        f"(default: {DEFAULT_BPE_SAMPLE_DOCS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the BPE training sample (default: 0)")
    p.add_argument("--max-doc-mb", type=float, default=DEFAULT_MAX_DOC_MB,
                   help="refuse a larger document: tokenizing one takes ~130 bytes per character "
                        f"(default: {DEFAULT_MAX_DOC_MB:g})")
    p.add_argument("--ray", action="store_true",
                   help="run as a Ray Data job (joins RAY_ADDRESS, else starts Ray here)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer workers of the Ray Data job (implies --ray; default: the "
                        "cluster's CPUs)")
    _add_out(p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`data synthetic` and `data corpus` under the `data` command's parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="{synthetic,corpus}", required=True)
    _add_synthetic(sub)
    _add_corpus(sub)


def _shard_bytes(shard_mb: float) -> int:
    if shard_mb <= 0:
        raise DataError(f"--shard-mb must be > 0, got {shard_mb}")
    return max(1, int(shard_mb * (1 << 20)))


def _run_synthetic(args: argparse.Namespace) -> None:
    from ft_ray.data.shards import write_synthetic_shards

    write_synthetic_shards(args.task, args.num_sequences, args.seed, args.out,
                           val_fraction=args.val_fraction, shard_max_bytes=_shard_bytes(args.shard_mb),
                           overwrite=args.overwrite)


def _corpus_spec(args: argparse.Namespace):
    from ft_ray.data.corpus_plan import CorpusSpec

    if args.buckets != "auto" and not args.buckets.isdigit():
        raise DataError(f"--buckets must be a number or auto, got {args.buckets!r}")
    if args.max_doc_mb <= 0:
        raise DataError(f"--max-doc-mb must be > 0, got {args.max_doc_mb:g}")
    spec = CorpusSpec(source=args.source, tokenizer=args.tokenizer, seq_len=args.seq_len, column=args.column,
                      val_fraction=args.val_fraction, shard_max_bytes=_shard_bytes(args.shard_mb),
                      num_buckets=None if args.buckets == "auto" else int(args.buckets),
                      max_doc_bytes=int(args.max_doc_mb * (1 << 20)),
                      bpe_sample_docs=args.bpe_sample_docs, seed=args.seed)
    spec.check()
    return spec


def _run_corpus(args: argparse.Namespace) -> None:
    from ft_ray.data.shards import check_out_dir

    check_out_dir(args.out, args.overwrite)  # a refused --out costs no BPE training or tokenizing
    spec = _corpus_spec(args)
    progress = lambda line: print(line, flush=True)  # noqa: E731
    if args.ray or args.workers is not None:
        from ft_ray.data.prepare import prepare_corpus

        if args.workers is not None and args.workers < 1:
            raise DataError(f"--workers must be >= 1, got {args.workers}")
        prepare_corpus(spec, args.out, overwrite=args.overwrite, concurrency=args.workers, progress=progress)
    else:
        _run_corpus_here(spec, args, progress)


def _run_corpus_here(spec, args: argparse.Namespace, progress) -> None:
    """The single-process writer: the same shards as the Ray Data job, in this process."""
    from ft_ray.data.corpus_plan import build_tokenizer, plan_source, resolve_buckets
    from ft_ray.data.shards import write_corpus_shards
    from ft_ray.data.sources import iter_documents

    plan = plan_source(spec)  # an unknown source fails before BPE training (hf: checked on read)
    if spec.tokenizer.startswith("bpe:"):
        progress(f"training {spec.tokenizer} on up to {spec.bpe_sample_docs} documents of {spec.source} "
                 f"(seed {spec.seed}) ...")
    # a tokenizer.json is read whole here, so it may live in the --out it will be replaced in
    tok = build_tokenizer(spec, plan)
    write_corpus_shards(iter_documents(spec.source, spec.column, spec.max_doc_bytes), tok, spec.seq_len,
                        args.out, val_fraction=spec.val_fraction, shard_max_bytes=spec.shard_max_bytes,
                        progress=progress, source=spec.source, tokenizer_spec=spec.tokenizer,
                        overwrite=args.overwrite, num_buckets=resolve_buckets(spec, plan))


def run(args: argparse.Namespace) -> int:
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

