"""Tokenizers for the shards: byte-level, trained BPE, the letter task's characters, or a file.

Every tokenizer is a Hugging Face `tokenizers.Tokenizer`, so the one saved beside the shards
(`tokenizer.json`) loads anywhere with `Tokenizer.from_file` and decodes ids back to the exact
text. The tokenizers built here share the special tokens `<pad>`, `<bos>`, `<eos>` at ids 0, 1, 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

from ft_ray.data import letters
from ft_ray.data.errors import DataError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
NUM_BYTES = 256
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + NUM_BYTES  # every byte must stay encodable

# token strings accepted as each role in a tokenizer.json we did not build
BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order: the symbols ByteLevel emits.

    Ordering them by byte value makes the byte tokenizer's ids readable: id = 3 + byte.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(NUM_BYTES):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(NUM_BYTES + extra))
            extra += 1
    return symbols


def _finish(tok: Tokenizer) -> Tokenizer:
    """Register the specials, and keep their spellings in document text as plain text.

    Without `encode_special_tokens`, a document that literally contains "<eos>" would be
    encoded as the EOS id and decode to nothing: the round trip would not be exact.
    """
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.encode_special_tokens = True
    return tok


def byte_tokenizer() -> Tokenizer:
    """256 byte symbols after the specials, no merges: any str round-trips, no training."""
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS + _byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # one pre-token per document: without merges, splitting on words would change nothing
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _finish(tok)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `texts`; the byte alphabet is always kept, so nothing is unknown.

    Unlike the byte tokenizer this splits with GPT-2's regex, so merges stay inside words,
    whitespace runs and punctuation runs (better tokens, faster training); bytes are kept
    verbatim, so the round trip is still exact.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"tokenizer bpe:{vocab_size}: vocab size must be >= {MIN_BPE_VOCAB} "
                        f"({len(SPECIAL_TOKENS)} special tokens + {NUM_BYTES} bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _finish(tok)


def letter_tokenizer() -> Tokenizer:
    """One token per character with exactly letters.py's ids, saved with the synthetic shards."""
    vocab = {s: i for i, s in enumerate(letters.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters, no spaces between tokens
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _from_file(spec: str) -> Tokenizer:
    path = Path(spec)
    if path.is_dir():  # a shard directory (or any folder) holding its tokenizer.json
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON or schema
        raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
    eos_id(tok, where=str(path))  # packing needs a document separator: fail now, not later
    return tok


def load_tokenizer(spec: str, texts_factory: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """`bytes`, `bpe:<vocab size>` (trained on `texts_factory()`) or a path to a tokenizer.json."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit():
            raise DataError(f"tokenizer {spec!r}: expected bpe:<vocab size>, e.g. bpe:8192")
        if texts_factory is None:
            raise DataError(f"tokenizer {spec!r} must be trained on a corpus; none was given")
        return train_bpe(texts_factory(), int(size))
    if spec.endswith(".json") or Path(spec).exists():
        return _from_file(spec)
    raise DataError(f"unknown tokenizer {spec!r}: expected 'bytes', 'bpe:<vocab size>' "
                    "or the path of a tokenizer.json")


def vocab_size(tok: Tokenizer) -> int:
    """One past the largest id, so every id the tokenizer can emit fits (files may have holes)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _find(tok: Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def eos_id(tok: Tokenizer, where: str = "tokenizer") -> int:
    """The document separator used when packing; a tokenizer without one cannot be used."""
    i = _find(tok, EOS_NAMES)
    if i is None:
        raise DataError(f"{where}: no end-of-sequence token (looked for {', '.join(EOS_NAMES)})")
    return i


def bos_id(tok: Tokenizer) -> int | None:
    return _find(tok, BOS_NAMES)


def pad_id(tok: Tokenizer) -> int | None:
    return _find(tok, PAD_NAMES)


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of whole documents, no specials added (packing adds EOS itself).

    A document is text: a literal "<eos>" inside it must stay text, not become the separator.
    The flag is not saved in tokenizer.json, so it is set here for tokenizers loaded from files.
    """
    tok.encode_special_tokens = True
    # the fast variant skips offsets: ~2x the throughput and far less memory per token
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
