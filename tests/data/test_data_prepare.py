"""Corpus preparation on Ray Data (ft_ray/data/prepare.py) against the single-process writer:
byte-identical shards whatever the number of workers, buckets packed on their own, every source
kind read the same way, the BPE sample, resume after an interruption, and bad input as one line
with nothing left behind. Tests without Ray come first; the Ray ones share the session cluster."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ft_ray.cli import main as cli_main
from ft_ray.data import corpus_plan, prepare
from ft_ray.data import tokenizer as tk
from ft_ray.data.corpus_plan import (
    CorpusSpec,
    bpe_texts,
    build_tokenizer,
    plan_source,
    resolve_buckets,
)
from ft_ray.data.errors import DataError
from ft_ray.data.prepare import plan_units, prepare_corpus
from ft_ray.data.prepare_work import work_dir_of
from ft_ray.data.shards import bucket_of, read_split, split_of, validate_shards, write_corpus_shards
from ft_ray.data.sources import Skipped, iter_documents, list_pieces, read_pieces

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EMAIL = str(STDLIB / "email" / "**" / "*.py")  # ~40 files, an empty __init__.py among them
SEQ_LEN, VAL_FRACTION, SHARD_BYTES = 64, 0.2, 30 * 65 * 2  # 30 rows of uint16 per shard


def quiet(line: str) -> None:
    pass


def snapshot(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def spec(**kw) -> CorpusSpec:
    return CorpusSpec(**({"source": EMAIL, "tokenizer": "bytes", "seq_len": SEQ_LEN, "val_fraction": VAL_FRACTION,
                          "shard_max_bytes": SHARD_BYTES} | kw))


def single_process(s: CorpusSpec, out: Path) -> dict:
    """What `ft-ray data corpus` without --ray does with the same spec."""
    plan = plan_source(s)
    return write_corpus_shards(iter_documents(s.source, s.column, s.max_doc_bytes), build_tokenizer(s, plan),
                               s.seq_len, out, val_fraction=s.val_fraction, shard_max_bytes=s.shard_max_bytes,
                               progress=quiet, source=s.source, tokenizer_spec=s.tokenizer,
                               num_buckets=resolve_buckets(s, plan))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))


# --- without Ray ---------------------------------------------------------------------------------


def tables(root: Path) -> dict[str, str]:
    """The same 300 short texts as every table source kind; -> {kind: source}."""
    texts = [f"row {i}: " + "word " * (i % 37) for i in range(300)]
    texts[7] = ""  # an empty cell: skipped and counted
    (root / "pq").mkdir()
    pq.write_table(pa.table({"text": texts[:200], "n": list(range(200))}), root / "pq" / "a.parquet",
                   row_group_size=64)  # 4 row groups, read as 4 pieces
    pq.write_table(pa.table({"text": texts[200:]}), root / "pq" / "b.parquet")
    (root / "arrow").mkdir()
    with pa.ipc.new_stream(root / "arrow" / "data.arrow", pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": texts}))
    (root / "jsonl").mkdir()
    (root / "jsonl" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:150]) + "\n")
    (root / "jsonl" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[150:]))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(root / "saved")
    return {"parquet": str(root / "pq"), "arrow": str(root / "arrow"), "jsonl": str(root / "jsonl"),
            "saved": str(root / "saved"), "hf": f"hf:{root / 'pq'}"}


@pytest.fixture(scope="module")
def table_sources(tmp_path_factory) -> dict[str, str]:
    return tables(tmp_path_factory.mktemp("tables"))


def test_pieces_read_the_same_documents_as_the_stream(table_sources, monkeypatch):
    monkeypatch.setattr("ft_ray.data.sources.SAVED_PIECE_ROWS", 128)  # 3 pieces of the saved dataset
    for kind, source in table_sources.items():
        if kind == "hf":
            continue  # streamed: no pieces (the Ray job spools it; tested there)
        stream = iter_documents(source)
        docs = [(d.id, d.text) for d in stream]
        pieces, skipped = list_pieces(source), Skipped()
        assert len(pieces) == {"parquet": 5, "arrow": 1, "jsonl": 2, "saved": 3}[kind]
        assert [(d.id, d.text) for d in read_pieces(pieces, "text", skipped)] == docs, kind
        assert len(docs) == 299 and skipped.num_empty == stream.skipped.num_empty == 1
    ids = {d.id for d in iter_documents(table_sources["jsonl"])}  # rows per file; the blank line is none
    assert {"a.jsonl:149", "b.jsonl:0", "b.jsonl:149"} <= ids and not {"a.jsonl:7", "a.jsonl:150"} & ids
    files = list_pieces(EMAIL)
    assert [p.name for p in files] == sorted(p.name for p in files) and all(p.kind == "file" for p in files)


def test_buckets_are_a_hash_independent_of_the_split():
    ids = [f"doc{i}" for i in range(4000)]
    buckets = [bucket_of(i, 8) for i in ids]
    assert buckets == [bucket_of(i, 8) for i in ids] and set(buckets) == set(range(8))
    assert all(b == 0 for b in (bucket_of(i, 1) for i in ids[:50]))
    counts = np.bincount(buckets, minlength=8)
    assert counts.min() > 400  # ~500 each
    val = [b for i, b in zip(ids, buckets, strict=True) if split_of(i, 0.25) == "val"]
    assert set(val) == set(range(8))  # the split does not decide the bucket


def test_bucketed_packing_equals_an_independent_computation(tmp_path):
    """With B buckets, each (split, bucket) is its own stream: ids + EOS per document in
    source order, cut into rows of seq_len + 1; the split's rows are the buckets' in order."""
    manifest = single_process(spec(num_buckets=3), tmp_path)
    tok, streams = tk.byte_tokenizer(), {}
    for doc in iter_documents(EMAIL):
        key = split_of(doc.id, VAL_FRACTION), bucket_of(doc.id, 3)
        streams.setdefault(key, []).extend(tok.encode(doc.text, add_special_tokens=False).ids + [2])
    for split in ("train", "val"):
        rows, dropped = [], 0
        for b in range(3):
            stream = streams.get((split, b), [])
            n = len(stream) // (SEQ_LEN + 1)
            rows.append(np.array(stream[: n * (SEQ_LEN + 1)]).reshape(n, SEQ_LEN + 1))
            dropped += len(stream) % (SEQ_LEN + 1)
        assert np.array_equal(read_split(tmp_path, split), np.concatenate(rows))
        assert manifest["splits"][split]["num_dropped_tokens"] == dropped
    names = [s["file"] for s in manifest["splits"]["train"]["shards"]]
    assert names[0] == "train-0000-00000.parquet" and names == sorted(names) and manifest["num_buckets"] == 3
    assert manifest["skipped"]["empty"] == 1 and manifest["skipped"]["empty_examples"][0].endswith("__init__.py")
    validate_shards(tmp_path)


def test_auto_buckets_and_units(monkeypatch):
    plan = plan_source(spec())
    assert resolve_buckets(spec(), plan) == 1 and resolve_buckets(spec(num_buckets=5), plan) == 5
    monkeypatch.setattr(corpus_plan, "BUCKET_BYTES", 100_000)
    assert resolve_buckets(spec(), plan) == -(-plan.num_bytes // 100_000) > 1
    assert resolve_buckets(spec(source="hf:x"), None) == 1  # a stream's size is unknown
    monkeypatch.setattr(prepare, "UNIT_MIN_BYTES", 20_000)
    units = plan_units(plan)
    assert len(units) > 5 and [p for u in units for p in u] == plan.pieces


def test_bpe_sample_is_seeded_and_bounded(table_sources):
    s = spec(source=table_sources["parquet"], tokenizer="bpe:300", bpe_sample_docs=100)
    plan = plan_source(s)
    first, again = list(bpe_texts(s, plan)), list(bpe_texts(s, plan))
    other = list(bpe_texts(CorpusSpec(**(vars(s) | {"seed": 1})), plan))
    assert first == again and first != other
    assert 100 <= len(first) < 200  # whole row groups (64 rows) until 100 documents
    everything = [d.text for d in iter_documents(s.source)]
    assert list(bpe_texts(CorpusSpec(**(vars(s) | {"bpe_sample_docs": 10_000})), plan)) == everything
    hf = spec(source=table_sources["hf"], bpe_sample_docs=50)
    assert list(bpe_texts(hf, None)) == everything[:50]  # a stream: its first documents


def test_documents_too_large_unreadable_or_of_the_wrong_type(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.txt").write_text("x" * 5000)
    (tmp_path / "src" / "ok.txt").write_text("fine")
    with pytest.raises(DataError, match=r"big\.txt is 0\.00477 MiB, more than --max-doc-mb 0\.00381 allows"):
        plan_source(spec(source=str(tmp_path / "src" / "*.txt"), max_doc_bytes=4000))
    pq.write_table(pa.table({"text": ["a", "y" * 5000]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"document t\.parquet:1 is"):
        list(iter_documents(str(tmp_path), max_doc_bytes=4000))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: column 'text' is int64, not text"):
        plan_source(spec(source=str(tmp_path)))
    (tmp_path / "src" / "mem.txt").symlink_to("/proc/self/mem")  # a file even root cannot read
    with pytest.raises(DataError, match=r"mem\.txt: cannot read \(Input/output error\)"):
        list(iter_documents(str(tmp_path / "src" / "*.txt")))


# --- on Ray Data ---------------------------------------------------------------------------------


@pytest.fixture
def small_units(monkeypatch):
    """~16 units of the email package (0.4 MB) instead of ~6, so 2 workers really share the work."""
    monkeypatch.setattr(prepare, "UNIT_MIN_BYTES", 16_000)


@pytest.mark.parametrize("tokenizer, buckets", [("bytes", 4), ("bpe:400", 3)])
def test_shards_are_byte_identical_with_1_and_2_workers_and_in_one_process(
        ray_cluster, small_units, tmp_path, tokenizer, buckets):
    s = spec(tokenizer=tokenizer, num_buckets=buckets)
    lines: list[str] = []
    prepare_corpus(s, tmp_path / "w1", concurrency=1, progress=quiet)
    manifest = prepare_corpus(s, tmp_path / "w2", concurrency=2, progress=lines.append)
    single_process(s, tmp_path / "one")
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2") == snapshot(tmp_path / "one")
    assert any(line.startswith("tokenizing ") and "with 2 workers" in line for line in lines)
    assert lines[-1].startswith(f"wrote {tmp_path / 'w2'}: train {manifest['splits']['train']['num_sequences']}")
    assert manifest["num_buckets"] == buckets and len({s["file"][:10] for s in manifest["splits"]["train"]["shards"]}) \
        == buckets
    assert leftovers(tmp_path / "w2") == []  # the work directory is gone


def test_one_bucket_is_the_single_process_writers_default_layout(ray_cluster, small_units, tmp_path):
    prepare_corpus(spec(), tmp_path / "ray", concurrency=2, progress=quiet)  # auto: B = 1 below 1 GiB
    write_corpus_shards(iter_documents(EMAIL), tk.byte_tokenizer(), SEQ_LEN, tmp_path / "one",
                        val_fraction=VAL_FRACTION, shard_max_bytes=SHARD_BYTES, progress=quiet,
                        source=EMAIL, tokenizer_spec="bytes")
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "one")
    assert "train-00000.parquet" in snapshot(tmp_path / "ray")


def test_every_table_source_kind_matches_the_single_process_writer(ray_cluster, table_sources, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(prepare, "UNIT_MIN_BYTES", 1)  # a unit per piece
    monkeypatch.setattr(prepare, "HF_PART_DOCS", 100)  # the stream spooled as 3 parts
    for kind, source in table_sources.items():
        s = spec(source=source, seq_len=16, num_buckets=2, val_fraction=0.1)
        manifest = prepare_corpus(s, tmp_path / kind, concurrency=2, progress=quiet)
        single_process(s, tmp_path / f"{kind}-one")
        assert snapshot(tmp_path / kind) == snapshot(tmp_path / f"{kind}-one"), kind
        assert manifest["skipped"]["empty"] == 1
        assert sum(v["num_documents"] for v in manifest["splits"].values()) == 299


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_at(prefix: str):
    def progress(line: str) -> None:
        if line.startswith(prefix):
            raise Interrupt(line)
    return progress


def test_interrupted_run_resumes_keeping_verified_work(ray_cluster, small_units, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PROGRESS_SECONDS", 0.0)  # a progress line per unit and bucket
    s, out = spec(num_buckets=3), tmp_path / "out"
    prepare_corpus(s, tmp_path / "reference", concurrency=2, progress=quiet)
    work = work_dir_of(out)
    with pytest.raises(Interrupt):
        prepare_corpus(s, out, concurrency=2, progress=interrupt_at("  units 6/"))
    assert not out.exists() and (work / "job.json").is_file()
    markers = sorted((work / "spool").glob("u*.json"))
    assert len(markers) >= 6
    spool = work / "spool" / json.loads(markers[0].read_text())["file"]
    spool.write_bytes(spool.read_bytes()[:-2])  # cut off mid-write: no longer what its marker says
    (work / "spool" / "u000999.tok.tmp-dead").write_bytes(b"half")  # a killed writer's temporary
    refused: list[str] = []
    with pytest.raises(DataError, match=r"holds an interrupted preparation of something else \(seq_len: 64 -> 32"):
        prepare_corpus(spec(num_buckets=3, seq_len=32), out, concurrency=2, progress=refused.append)
    with pytest.raises(Interrupt):  # resumes stage 1, then is cut off while packing
        prepare_corpus(s, out, concurrency=2, progress=interrupt_at("  buckets 2/"))
    assert len(list((work / "shards").glob("*.json"))) >= 2 and not out.exists()
    lines: list[str] = []
    prepare_corpus(s, out, concurrency=1, progress=lines.append)  # another worker count: same work
    assert lines[0] == f"resuming the interrupted preparation in {work}"
    assert any("kept from the interrupted run" in line and line.startswith("  units") for line in lines)
    assert any("kept from the interrupted run" in line and line.startswith("  buckets") for line in lines)
    assert snapshot(out) == snapshot(tmp_path / "reference")
    assert leftovers(out) == [] and validate_shards(out)["num_buckets"] == 3


def data_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["data", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bad_tree(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Bad inputs -> (corpus arguments, fragments of the one-line error)."""
    root.mkdir()
    for name, texts in {"nulls": ["x" * 50] * 30 + [None], "huge": ["x" * 50] * 30 + ["y" * 3000]}.items():
        (root / name).mkdir()
        pq.write_table(pa.table({"text": texts}), root / name / "t.parquet")
    (root / "ints").mkdir()
    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "ints" / "t.parquet")
    (root / "files").mkdir()
    for i in range(20):
        (root / "files" / f"{i:02d}.txt").write_text(f"file {i}\n" * 40)
    (root / "files" / "15.txt").unlink()
    (root / "files" / "15.txt").symlink_to("/proc/self/mem")  # unreadable, even for root
    (root / "bin").mkdir()
    (root / "bin" / "a.bin").write_bytes(b"\0" * 100)
    (root / "bin" / "b.txt").write_text("")
    return {
        "glob matches nothing": (["--source", str(root / "*.nothing")], ["produced no documents"]),
        "column missing": (["--source", str(root / "nulls"), "--column", "body"],
                           ["t.parquet: no column 'body'", "available: text"]),
        "column not text": (["--source", str(root / "ints")], ["t.parquet: column 'text' is int64, not text"]),
        "null cell": (["--source", str(root / "nulls")], ["t.parquet: column 'text' row 30 is NoneType"]),
        "document too large": (["--source", str(root / "huge"), "--max-doc-mb", "0.002"],
                               ["document t.parquet:30 is", "--max-doc-mb 0.002"]),
        "unreadable file among many": (["--source", str(root / "files" / "*.txt")],
                                       ["15.txt: cannot read (Input/output error)"]),
        "nothing but binary and empty files": (["--source", str(root / "bin" / "*")],
                                               ["produced no text documents", "1 binary files and 1 empty"]),
        "tokenizer file is not a tokenizer": (["--source", str(root / "files" / "0*.txt"), "--tokenizer",
                                               str(root / "nulls" / "t.parquet")], ["not a valid tokenizer.json"]),
    }


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(ray_cluster, tmp_path, capsys):
    cases = bad_tree(tmp_path / "src")
    for name, (args, fragments) in cases.items():
        out = tmp_path / "out"
        args = [*args, "--tokenizer", "bytes"] if "--tokenizer" not in args else args
        code, _, err = data_cli(capsys, "corpus", *args, "--seq-len", "16", "--workers", "2", "--out", str(out))
        last = err.strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err and last.startswith("ft-ray data corpus: error: "), (name, err)
        for fragment in fragments:
            assert fragment in last, (name, fragment, last)
        assert not out.exists() and leftovers(out) == [], name  # no --out, no work directory


def test_cli_ray_path_the_overwrite_rule_and_another_tokenizer(ray_cluster, tmp_path, capsys, monkeypatch):
    out, source = tmp_path / "out", str(STDLIB / "email" / "[a-h]*.py")
    args = ["corpus", "--source", source, "--tokenizer", "bytes", "--seq-len", "32", "--buckets", "2", "--ray"]
    code, text, err = data_cli(capsys, *args, "--out", str(out))
    assert code == 0, err
    assert text.strip().splitlines()[-1].startswith(f"wrote {out}: train ")
    assert "shards written on 1 node(s)" in text
    before = snapshot(out)
    code, _, err = data_cli(capsys, *args, "--out", str(out))  # a shard set is there: the --overwrite rule
    assert code == 2 and f"--out {out} is not empty" in err.strip().splitlines()[-1]
    assert snapshot(out) == before

    monkeypatch.setattr(prepare, "UNIT_MIN_BYTES", 16_000)
    monkeypatch.setattr(prepare, "PROGRESS_SECONDS", 0.0)
    (tmp_path / "a.json").write_text(tk.byte_tokenizer().to_str())
    with pytest.raises(Interrupt):  # an interrupted run with tokenizer a.json ...
        prepare_corpus(spec(source=source, tokenizer=str(tmp_path / "a.json")), tmp_path / "new",
                       concurrency=2, progress=interrupt_at("  units 2/"))
    (tmp_path / "a.json").write_text(tk.train_bpe(["some text"] * 10, 300).to_str())  # ... which changed since
    again = ["corpus", "--source", source, "--tokenizer", str(tmp_path / "a.json"), "--seq-len", str(SEQ_LEN),
             "--val-fraction", str(VAL_FRACTION), "--shard-mb", str(SHARD_BYTES / 2**20), "--workers", "2",
             "--out", str(tmp_path / "new")]
    code, _, err = data_cli(capsys, *again)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "holds an interrupted preparation of something else (tokenizer_sha256: " in last, err
    assert "add --overwrite to discard it" in last and work_dir_of(tmp_path / "new").is_dir()
    code, text, err = data_cli(capsys, *again, "--overwrite")
    assert code == 0 and f"discarding the interrupted preparation in {work_dir_of(tmp_path / 'new')}" in text, err
    assert validate_shards(tmp_path / "new")["vocab_size"] != 259 and leftovers(out) == []  # the new tokenizer
