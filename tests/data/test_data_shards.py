"""Shards: packing equals an independent computation, hash split, rolling, sources, validation, CLI,
atomic writes (a failed run leaves the old set byte for byte) and binary files skipped."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from ft_ray.cli import main as cli_main
from ft_ray.data import letters, shards, synthetic
from ft_ray.data import tokenizer as tk
from ft_ray.data.errors import DataError
from ft_ray.data.shards import (
    read_split,
    rows_table,
    token_dtype,
    validate_shards,
    write_corpus_shards,
    write_synthetic_shards,
)
from ft_ray.data.sources import Document, iter_documents, stdlib_files
from ft_ray.seeds import derive_seed

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EMAIL_GLOB = str(STDLIB / "email" / "*.py")  # ~20 real files
SEQ_LEN, VAL_FRACTION = 64, 0.2


def corpus(out: Path, splits: dict[str, str] | None = None, **kw) -> dict:
    """Byte-tokenized email package; `splits` collects doc id -> split."""
    record = None if splits is None else (lambda split, doc_id: splits.__setitem__(doc_id, split))
    kw = {"val_fraction": VAL_FRACTION, "progress": lambda line: None, "on_document": record} | kw
    return write_corpus_shards(iter_documents(EMAIL_GLOB), tk.byte_tokenizer(), SEQ_LEN, out,
                               source=EMAIL_GLOB, tokenizer_spec="bytes", **kw)


def expected_rows(split: str) -> tuple[np.ndarray, int]:
    """Packed rows computed here from scratch: ids + EOS per document of the split, cut to 65."""
    tok, stream = tk.byte_tokenizer(), []
    for path in sorted(STDLIB.glob("email/*.py")):
        h = int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "big")
        if ("val" if h < VAL_FRACTION * 2**64 else "train") == split:
            stream += tok.encode(path.read_text(errors="replace"), add_special_tokens=False).ids + [2]
    n = len(stream) // (SEQ_LEN + 1)
    return np.array(stream[: n * (SEQ_LEN + 1)]).reshape(n, SEQ_LEN + 1), len(stream) % (SEQ_LEN + 1)


@pytest.fixture(scope="module")
def email_set(tmp_path_factory) -> tuple[Path, dict, dict[str, str]]:
    out, splits = tmp_path_factory.mktemp("email"), {}
    return out, corpus(out, splits), splits


@pytest.fixture
def syn(tmp_path) -> Path:
    """A small synthetic set with several train shards (40 rows of 68 bytes each)."""
    write_synthetic_shards("letters", 100, 0, tmp_path, shard_max_bytes=40 * 68,
                           progress=lambda line: None)
    return tmp_path


def test_packing_equals_independent_computation(email_set):
    out, manifest, _ = email_set
    for split in ("train", "val"):
        rows, dropped = expected_rows(split)
        assert len(rows) > 0
        assert np.array_equal(read_split(out, split), rows)
        info = manifest["splits"][split]
        assert (info["num_sequences"], info["num_tokens"], info["num_dropped_tokens"]) == \
            (len(rows), rows.size, dropped)
    assert manifest["seq_len"] == SEQ_LEN and manifest["vocab_size"] == 259
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == 2
    assert validate_shards(out, vocab_size=259, seq_len=SEQ_LEN) == manifest


def test_split_is_disjoint_and_deterministic(email_set, tmp_path):
    _, manifest, splits = email_set
    names = sorted(str(p) for p in STDLIB.glob("email/*.py"))
    assert sorted(splits) == names  # every document seen once
    train = {d for d, s in splits.items() if s == "train"}
    val = {d for d, s in splits.items() if s == "val"}
    assert train and val and not train & val
    assert (manifest["splits"]["train"]["num_documents"], manifest["splits"]["val"]["num_documents"]) \
        == (len(train), len(val))
    again: dict[str, str] = {}
    corpus(tmp_path, again)
    assert again == splits


def test_saved_tokenizer_decodes_the_first_document(email_set):
    out, _, splits = email_set
    loaded = Tokenizer.from_file(str(out / "tokenizer.json"))
    flat = read_split(out, "train").reshape(-1)
    first = next(d for d in sorted(splits) if splits[d] == "train")
    ids = flat[: int(np.argmax(flat == 2))].tolist()
    assert loaded.decode(ids) == Path(first).read_text(errors="replace")


def test_bpe_shards_decode_with_the_saved_tokenizer(tmp_path):
    def texts():
        return (d.text for d in iter_documents(EMAIL_GLOB))

    lines: list[str] = []
    tok = tk.load_tokenizer("bpe:400", texts)
    manifest = write_corpus_shards(iter_documents(EMAIL_GLOB), tok, 32, tmp_path, val_fraction=0.0,
                                   progress=lines.append, tokenizer_spec="bpe:400")
    assert manifest["vocab_size"] == 400 and manifest["tokenizer"] == "bpe:400"
    assert lines[-1].startswith(f"wrote {tmp_path}: train {manifest['splits']['train']['num_sequences']}")
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    flat = read_split(tmp_path, "train").reshape(-1)
    ends = np.flatnonzero(flat == manifest["eos_id"])
    first_two = [flat[: ends[0]], flat[ends[0] + 1: ends[1]]]
    paths = sorted(STDLIB.glob("email/*.py"))[:2]
    assert [loaded.decode(ids.tolist()) for ids in first_two] == [p.read_text() for p in paths]


def test_shards_load_with_datasets_and_pyarrow(email_set):
    out, manifest, _ = email_set
    files = [str(out / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    table = pq.read_table(files[0])
    assert table.schema.field("tokens").type == pa.list_(pa.uint16())
    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    assert np.array_equal(np.array(ds["tokens"]), read_split(out, "train"))


def test_smallest_dtype():
    assert [token_dtype(v) for v in (2, 256, 257, 65536, 65537)] == \
        [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32]


def test_rolling_shards_union_is_the_split(email_set, tmp_path, monkeypatch):
    out, manifest, _ = email_set
    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 20 * 65 * 2)  # row groups of 20 rows
    rolled = corpus(tmp_path, shard_max_bytes=50 * 65 * 2)  # 50 rows of 65 uint16 per shard
    shards_ = rolled["splits"]["train"]["shards"]
    assert len(shards_) >= 3
    row_groups = pq.ParquetFile(tmp_path / shards_[0]["file"]).metadata
    assert [row_groups.row_group(i).num_rows for i in range(row_groups.num_row_groups)] == [20, 20, 10]
    assert [s["file"] for s in shards_] == [f"train-{i:05d}.parquet" for i in range(len(shards_))]
    assert all(s["num_rows"] == 50 for s in shards_[:-1]) and 1 <= shards_[-1]["num_rows"] <= 50
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path, split), read_split(out, split))
    validate_shards(tmp_path)


def test_writing_streams_documents(tmp_path, monkeypatch):
    """Shards reach the disk while documents are still being read: the corpus is never held.

    They go to the hidden sibling that replaces `out` once the set is complete.
    """
    monkeypatch.setattr(shards, "PROGRESS_SECONDS", 0.0)
    seen, lines, out = [], [], tmp_path / "out"

    def docs():
        for i in range(400):
            seen.append(len(list(tmp_path.glob(".out.tmp-*/train-*.parquet"))))
            yield Document(f"doc{i}", "x" * 100)

    write_corpus_shards(docs(), tk.byte_tokenizer(), 63, out, val_fraction=0.0,
                        shard_max_bytes=10 * 64 * 2, progress=lines.append)
    assert seen[200] >= 2 and seen[-1] > seen[200]
    assert "400 documents, 0.0M tokens" in lines[-3] and "MB written" in lines[-3]
    assert lines[-2].startswith("warning: the validation split is empty")
    assert lines[-1].startswith(f"wrote {out}: train ")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_synthetic_shards(syn):
    manifest = validate_shards(syn, vocab_size=len(letters.VOCAB), seq_len=67)
    assert manifest["dtype"] == "uint8" and len(manifest["splits"]["train"]["shards"]) == 3
    train, val = read_split(syn, "train"), read_split(syn, "val")
    # the rows `data.source: synthetic` generates on the fly for the same seed (one seed scheme)
    assert np.array_equal(train, synthetic.synthetic_rows("letters", 0, "train", np.arange(100)))
    assert np.array_equal(val, synthetic.synthetic_rows("letters", 0, "val", np.arange(5)))
    assert np.array_equal(train[:3], synthetic.generate("letters", 256, derive_seed(0, "train", 0))[:3])
    assert not np.array_equal(train[:5], val)
    loaded = Tokenizer.from_file(str(syn / "tokenizer.json"))
    for row in train[:20]:
        text = loaded.decode(row.tolist())
        assert text == letters.decode(row) and letters.check_body(text[2:], text[0]).valid
    assert pq.read_table(syn / "train-00000.parquet").schema.field("tokens").type == \
        pa.list_(pa.uint8())


def edit_manifest(root: Path, fn) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def rewrite_shard(root: Path, rows: np.ndarray) -> None:
    """Replace train-00000 with `rows` and make the manifest agree on rows and sha256."""
    pq.write_table(rows_table(rows), root / "train-00000.parquet")
    digest = hashlib.sha256((root / "train-00000.parquet").read_bytes()).hexdigest()
    shard = {"file": "train-00000.parquet", "num_rows": len(rows), "sha256": digest}
    edit_manifest(root, lambda m: m["splits"]["train"]["shards"].__setitem__(0, shard))


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def flip_footer(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-6:] = b"XXXXXX"  # footer length and PAR1 magic
    p.write_bytes(bytes(data))


SHARD = "train-00001.parquet"
CORRUPTIONS = {
    "truncated": (lambda r: truncate(r / SHARD), {}, [SHARD, "sha256"]),
    "truncated, no hash check": (lambda r: truncate(r / SHARD), {"check_hashes": False},
                                 [SHARD, "corrupt Parquet"]),
    "flipped byte": (lambda r: flip_middle(r / SHARD), {}, [SHARD, "sha256"]),
    "broken footer, no hash check": (lambda r: flip_footer(r / SHARD), {"check_hashes": False},
                                     [SHARD, "corrupt Parquet"]),
    "deleted": (lambda r: (r / SHARD).unlink(), {}, [SHARD, "missing"]),
    "num_rows edited": (lambda r: edit_manifest(r, lambda m: m["splits"]["train"]["shards"][1]
                                                .__setitem__("num_rows", 39)), {},
                        [SHARD, "num_rows", "39"]),
    "num_sequences edited": (lambda r: edit_manifest(r, lambda m: m["splits"]["val"]
                                                     .__setitem__("num_sequences", 6)), {},
                             ["manifest.json", "splits.val.num_sequences"]),
    "sha256 edited": (lambda r: edit_manifest(r, lambda m: m["splits"]["train"]["shards"][1]
                                              .__setitem__("sha256", "0" * 64)), {},
                      [SHARD, "sha256", "0000000000000000"]),
    "vocab_size edited": (lambda r: edit_manifest(r, lambda m: m.__setitem__("vocab_size", 10)), {},
                          ["train-00000.parquet", "token id", "vocab_size=10"]),
    "seq_len edited": (lambda r: edit_manifest(r, lambda m: m.__setitem__("seq_len", 66)), {},
                       ["train-00000.parquet", "68 tokens", "67"]),
    "token id >= vocab": (lambda r: rewrite_shard(r, np.full((40, 68), 200, np.uint8)), {},
                          ["train-00000.parquet", "token id 200", "vocab_size=58"]),
    "model vocab smaller": (lambda r: None, {"vocab_size": 32},
                            ["manifest.json", "vocab_size 58", "model's vocab_size 32"]),
    "model vocab below ids": (lambda r: edit_manifest(r, lambda m: m.__setitem__("vocab_size", 20)),
                              {"vocab_size": 32}, ["train-00000.parquet", "vocab_size=20"]),
    "config seq_len differs": (lambda r: None, {"seq_len": 64},
                               ["manifest.json", "seq_len 67", "config's seq_len 64"]),
    "missing key": (lambda r: edit_manifest(r, lambda m: m.pop("vocab_size")), {},
                    ["manifest.json", "missing key vocab_size"]),
    "missing split": (lambda r: edit_manifest(r, lambda m: m["splits"].pop("val")), {},
                      ["manifest.json", "missing key splits.val"]),
    "missing shard key": (lambda r: edit_manifest(r, lambda m: m["splits"]["train"]["shards"][2]
                                                  .pop("sha256")), {},
                          ["manifest.json", "splits.train.shards[2].sha256"]),
    "not JSON": (lambda r: (r / "manifest.json").write_text("{oops"), {},
                 ["manifest.json", "not valid JSON"]),
    "no manifest": (lambda r: (r / "manifest.json").unlink(), {}, ["manifest.json", "not found"]),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_validation_catches_corruption(syn, name):
    corrupt, kwargs, fragments = CORRUPTIONS[name]
    validate_shards(syn)  # clean before
    corrupt(syn)
    with pytest.raises(DataError) as err:
        validate_shards(syn, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="shard directory not found: .*nowhere"):
        validate_shards(tmp_path / "nowhere")


def test_empty_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match=r"source '.*\*\.nothing' produced no documents"):
        write_corpus_shards(iter_documents(str(tmp_path / "*.nothing")), tk.byte_tokenizer(), 8,
                            tmp_path / "o")
    with pytest.raises(DataError, match="unknown source 'no/such/place'"):
        iter_documents("no/such/place")  # raised at the call, before any reading
    with pytest.raises(DataError, match="fewer than seq_len \\+ 1 = 65 tokens"):
        write_corpus_shards([Document("a", "tiny")], tk.byte_tokenizer(), 64, tmp_path / "o",
                            progress=lambda line: None)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_stdlib_and_glob_sources(tmp_path):
    files = stdlib_files()
    assert len(files) > 500 and not any("site-packages" in p.parts for p in files)
    first = next(iter_documents("stdlib"))
    assert first.id == "stdlib/" + files[0].relative_to(STDLIB).as_posix()
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 ok")  # latin-1: not UTF-8
    (tmp_path / "a.txt").write_text("first")
    docs = list(iter_documents(str(tmp_path / "*.txt")))
    assert [Path(d.id).name for d in docs] == ["a.txt", "b.txt"]
    assert docs[1].text == "caf\ufffd ok"


def table_docs(source: str, column: str = "text") -> list[tuple[str, str]]:
    return [(d.id, d.text) for d in iter_documents(source, column)]


def test_parquet_arrow_and_saved_dataset_sources(tmp_path):
    table = pa.table({"text": ["alpha", "beta"], "n": [1, 2]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "part-0.parquet")
    assert table_docs(str(tmp_path / "pq")) == [("part-0.parquet:0", "alpha"), ("part-0.parquet:1", "beta")]
    (tmp_path / "arrow").mkdir()
    with pa.ipc.new_stream(tmp_path / "arrow" / "data.arrow", table.schema) as writer:
        writer.write_table(table)
    assert [t for _, t in table_docs(str(tmp_path / "arrow"))] == ["alpha", "beta"]
    datasets.Dataset.from_dict({"content": ["x y", "z"], "n": [1, 2]}).save_to_disk(tmp_path / "saved")
    assert table_docs(str(tmp_path / "saved"), "content") == [("row:0", "x y"), ("row:1", "z")]
    with pytest.raises(DataError, match=r"saved: no column 'text' \(available: content, n\)"):
        table_docs(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"part-0\.parquet: no column 'body' \(available: text, n\)"):
        table_docs(str(tmp_path / "pq"), "body")


def test_table_source_end_to_end(tmp_path):
    texts = [path.read_text() for path in sorted(STDLIB.glob("json/*.py"))]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "saved")
    manifest = write_corpus_shards(iter_documents(str(tmp_path / "saved")), tk.byte_tokenizer(),
                                   32, tmp_path / "out", val_fraction=0.0, progress=lambda line: None)
    flat = read_split(tmp_path / "out", "train").reshape(-1).tolist()
    assert manifest["splits"]["train"]["num_documents"] == len(texts)
    expected = tk.encode_batch(tk.byte_tokenizer(), [texts[0]])[0] + [2]
    assert flat[: len(expected)] == expected


def test_null_text_is_an_error(tmp_path):
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: column 'text' row 1 is NoneType, not text"):
        table_docs(str(tmp_path))


def test_hf_source_with_a_local_dataset_folder(tmp_path):
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "train.parquet")
    assert [t for _, t in table_docs(f"hf:{tmp_path}")] == ["one", "two"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ft_ray.cli", "data", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_synthetic_and_corpus(tmp_path):
    done = run_cli("synthetic", "--num-sequences", "200", "--out", str(tmp_path / "syn"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"wrote {tmp_path / 'syn'}: train 200 sequences")
    assert validate_shards(tmp_path / "syn")["splits"]["val"]["num_sequences"] == 10
    source = str(STDLIB / "email" / "[a-h]*.py")
    assert 5 <= len(list(iter_documents(source))) <= 15
    done = run_cli("corpus", "--source", source, "--tokenizer", "bytes", "--seq-len", "64",
                   "--out", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout.splitlines()[-1] and "seq_len 64" in done.stdout
    assert validate_shards(tmp_path / "c", seq_len=64)["tokenizer"] == "bytes"


@pytest.mark.parametrize("args, message", [
    (["--source", "no-such-source", "--tokenizer", "bytes"], "unknown source 'no-such-source'"),
    (["--source", "stdlib", "--tokenizer", "sentencepiece"], "unknown tokenizer 'sentencepiece'"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    done = run_cli("corpus", *args, "--seq-len", "64", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert "Traceback" not in done.stderr


# --- writes are atomic, refuse what they must not replace, and skip binary files ---------------


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` -> sha256 (files) or "dir": equal snapshots mean untouched."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def data_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`ft-ray data ...` in this process (a subprocess per case would cost seconds each)."""
    code = cli_main(["data", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def existing(tmp_path) -> tuple[Path, dict[str, str]]:
    """A shard set already in tmp_path/set, and its snapshot."""
    out = tmp_path / "set"
    write_synthetic_shards("letters", 100, 0, out, shard_max_bytes=40 * 68, progress=lambda line: None)
    return out, snapshot(out)


def assert_untouched(out: Path, before: dict[str, str]) -> None:
    assert snapshot(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no tmp, no old


def text_tree(root: Path) -> Path:
    """Two small text files (and, for the binary tests, nothing else yet)."""
    root.mkdir()
    (root / "a.txt").write_text("def first():\n    return 1\n" * 20)
    (root / "b.txt").write_text("second = 'two'\n" * 20)
    return root


def table_dir(root: Path, texts: list) -> Path:
    root.mkdir()
    pq.write_table(pa.table({"text": texts}), root / "t.parquet")
    return root


CORPUS = ["--tokenizer", "bytes", "--seq-len", "16", "--overwrite"]
FAILURES = {  # (source made under tmp_path, extra args) -> fragments of the one-line error
    "unknown column": (lambda t: table_dir(t / "tab", ["x" * 50]), ["--column", "txt"],
                       ["no column 'txt'", "available: text"]),
    "null row": (lambda t: table_dir(t / "tab", ["x" * 50, None]), [],
                 ["column 'text' row 1 is NoneType"]),
    "glob matches nothing": (lambda t: t / "*.nothing", [], ["produced no documents"]),
    "too short for a row": (lambda t: table_dir(t / "tab", ["tiny"]), [], ["fewer than seq_len"]),
}


@pytest.mark.parametrize("name", FAILURES)
def test_failed_corpus_run_leaves_the_old_set_byte_identical(existing, tmp_path, capsys, name):
    out, before = existing
    make_source, extra, fragments = FAILURES[name]
    code, _, err = data_cli(capsys, "corpus", "--source", str(make_source(tmp_path)), *extra,
                            *CORPUS, "--out", str(out))
    assert_one_line_error(code, err, *fragments)
    assert_untouched(out, before)


def failing_writer(monkeypatch, exc: type[BaseException], out: Path) -> list[int]:
    """Make the third shard close raise `exc`; returns how many shards were in the tmp dir then."""
    real_close, seen = shards._SplitWriter._close_shard, []

    def close_then_fail(self):
        real_close(self)
        seen.append(len(list(out.parent.glob(f".{out.name}.tmp-*/*.parquet"))))
        if len(seen) == 3:
            raise exc("injected")

    monkeypatch.setattr(shards._SplitWriter, "_close_shard", close_then_fail)
    return seen


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["corpus", "synthetic"])
def test_exception_mid_write_leaves_the_old_set(existing, monkeypatch, exc, kind):
    out, before = existing
    seen = failing_writer(monkeypatch, exc, out)
    with pytest.raises(exc, match="injected"):
        if kind == "corpus":
            corpus(out, shard_max_bytes=50 * 65 * 2, overwrite=True)
        else:
            write_synthetic_shards("letters", 300, 1, out, shard_max_bytes=40 * 68,
                                   progress=lambda line: None, overwrite=True)
    assert seen[-1] == 3  # shards had been written (beside `out`) when the write failed
    assert_untouched(out, before)


def test_non_empty_out_needs_overwrite(existing, tmp_path, capsys):
    out, before = existing
    code, out_text, err = data_cli(capsys, "synthetic", "--num-sequences", "50", "--out", str(out))
    assert_one_line_error(code, err, f"--out {out} is not empty", "--overwrite", "another --out")
    source = text_tree(tmp_path / "src") / "*.txt"
    code, out_text, err = data_cli(capsys, "corpus", "--source", str(source), "--tokenizer",
                                   "bpe:300", "--seq-len", "16", "--out", str(out))
    assert_one_line_error(code, err, f"--out {out} is not empty")
    assert "training" not in out_text  # refused before the BPE tokenizer was trained
    assert_untouched(out, before)
    with pytest.raises(DataError, match="not empty"):
        corpus(out)  # the writers are public API: they check too


def test_overwrite_replaces_the_set_and_leaves_no_sibling(existing, capsys):
    out, before = existing
    code, out_text, err = data_cli(capsys, "synthetic", "--num-sequences", "50", "--seed", "7",
                                   "--shard-mb", "1", "--overwrite", "--out", str(out))
    assert code == 0, err
    assert out_text.splitlines()[-1].startswith(f"wrote {out}: train 50 sequences")
    manifest = validate_shards(out)
    assert (manifest["seed"], manifest["splits"]["train"]["num_sequences"]) == (7, 50)
    assert sorted(snapshot(out)) == ["manifest.json", "tokenizer.json", "train-00000.parquet",
                                     "val-00000.parquet"]  # the old set's 3 train shards are gone
    assert_untouched(out, snapshot(out))


@pytest.mark.parametrize("foreign", ["notes.txt", "logs"])
def test_foreign_file_is_refused_even_with_overwrite(existing, capsys, foreign):
    out, _ = existing
    if foreign == "logs":
        (out / "logs").mkdir()  # a directory of ours is never in a shard set either
    else:
        (out / foreign).write_text("mine")
    before = snapshot(out)
    code, _, err = data_cli(capsys, "synthetic", "--overwrite", "--out", str(out))
    assert_one_line_error(code, err, f"--out {out} holds {foreign}", "never deletes",
                          "another --out")
    assert "--overwrite" not in err  # it would not help
    assert_untouched(out, before)


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    code, _, err = data_cli(capsys, "synthetic", "--overwrite", "--out", str(tmp_path / "f"))
    assert_one_line_error(code, err, "is not a directory")
    assert (tmp_path / "f").read_text() == "mine"


def test_tokenizer_from_the_out_directory(tmp_path, capsys):
    out, source = tmp_path / "set", str(text_tree(tmp_path / "src") / "*.txt")
    code, _, err = data_cli(capsys, "corpus", "--source", source, "--tokenizer", "bpe:300",
                            "--seq-len", "16", "--val-fraction", "0", "--out", str(out))
    assert code == 0, err
    first = read_split(out, "train")
    reuse = ["--tokenizer", str(out / "tokenizer.json"), "--seq-len", "16", "--val-fraction", "0",
             "--overwrite", "--out", str(out)]
    before = snapshot(out)
    code, _, err = data_cli(capsys, "corpus", "--source", str(tmp_path / "*.nothing"), *reuse)
    assert_one_line_error(code, err, "produced no documents")
    assert_untouched(out, before)  # tokenizer.json included
    code, _, err = data_cli(capsys, "corpus", "--source", source, *reuse)
    assert code == 0, err
    assert validate_shards(out)["tokenizer"] == str(out / "tokenizer.json")
    assert np.array_equal(read_split(out, "train"), first)  # same tokenizer, same ids


def binary_files(root: Path) -> list[str]:
    (root / "c.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)  # a NUL
    (root / "d.dat").write_bytes(bytes(range(128, 256)) * 8)  # no NUL, but no UTF-8 either
    return [str(root / "c.bin"), str(root / "d.dat")]


def test_binary_files_are_skipped_and_counted(tmp_path, capsys):
    src = text_tree(tmp_path / "src")
    (src / "e.txt").write_bytes(b"caf\xe9 au lait = 1\n" * 20)  # latin-1: text, a few U+FFFD
    skipped = binary_files(src)
    stream = iter_documents(str(src / "*"))
    assert [Path(d.id).name for d in stream] == ["a.txt", "b.txt", "e.txt"]
    assert (stream.skipped.num_binary, stream.skipped.examples) == (2, skipped)
    code, out_text, err = data_cli(capsys, "corpus", "--source", str(src / "*"), "--tokenizer",
                                   "bytes", "--seq-len", "16", "--out", str(tmp_path / "set"))
    assert code == 0, err
    lines = out_text.splitlines()
    assert lines[-2] == f"warning: skipped 2 binary files, e.g. {', '.join(skipped)}"
    assert lines[-1].startswith("wrote") and lines[-1].endswith("; 2 binary files skipped")
    manifest = validate_shards(tmp_path / "set")
    assert manifest["skipped"] == {"binary": 2, "examples": skipped}
    assert sum(manifest["splits"][s]["num_documents"] for s in ("train", "val")) == 3


def test_skipped_examples_are_capped(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(7):
        (tmp_path / "src" / f"{i}.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "src" / "text.txt").write_text("plain text")
    stream = iter_documents(str(tmp_path / "src" / "*"))
    assert len(list(stream)) == 1
    assert stream.skipped.num_binary == 7 and len(stream.skipped.examples) == 5


def test_all_binary_source_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    binary_files(src)
    code, _, err = data_cli(capsys, "corpus", "--source", str(src / "*"), "--tokenizer", "bytes",
                            "--seq-len", "16", "--out", str(tmp_path / "set"))
    assert_one_line_error(code, err, f"source '{src / '*'}' produced no text documents",
                          "2 binary files skipped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no set, no tmp dir
