"""`ft-ray export hf BUNDLE --out DIR [--overwrite]`: a bundle as a Hugging Face transformers model.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # it reads config.json

Needs the `hf` extra (pip install 'ft-ray[hf]'). Bad input ends with one line on stderr and exit
status 2; --out is replaced only by a complete export, so a refused or failed run leaves it as it was.
"""

from __future__ import annotations

import argparse
import sys

from ft_ray.entrypoint import EXIT_BAD_INPUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_format", metavar="{hf}", required=True)
    hf = sub.add_parser("hf", help="a Hugging Face transformers model directory (trust_remote_code)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hf.add_argument("bundle", help="bundle directory (model.safetensors, config.json, tokenizer.json)")
    hf.add_argument("--out", required=True, help="output directory")
    hf.add_argument("--overwrite", action="store_true", help="replace an export already in --out")


def run(args: argparse.Namespace) -> int:
    from ft_ray.export.hf import ExportError, export_hf

    try:
        out = export_hf(args.bundle, args.out, overwrite=args.overwrite)
    except (ExportError, OSError) as e:
        print(f"ft-ray export {args.export_format}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {args.bundle} to {out}")
    return 0
