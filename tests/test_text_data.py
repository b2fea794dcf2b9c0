"""Text data: built-in corpus, sentencepiece tokenizer, document sources, Grain packing loader."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import data_pipeline  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import grain

from data_pipeline import text_sources
from data_pipeline.corpus import DAYS, MONTHS, WORDS_TO_NUMBER, generate_documents, write_corpus
from data_pipeline.errors import DataError
from data_pipeline.text_loader import build_text_dataset, document_dataset, make_text_iterator
from data_pipeline.text_sources import (
    JsonlSource,
    TextFileSource,
    index_lines,
    open_text_source,
    open_text_sources,
    parse_tfds_spec,
)
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from moshax.config import TextDataConfig

from requirements import require_module

ROOT = Path(__file__).resolve().parents[1]

SEQ_LEN = 32


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), train_docs=1500, eval_docs=120, seed=0)


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "spm"
    return train_tokenizer([corpus["train"]], out, vocab_size=320, seed=0)


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def _cfg(corpus, tokenizer_path, **kw) -> TextDataConfig:
    base = dict(
        train_sources=[str(corpus["eval"])],  # small: every document is seen quickly
        eval_sources=[str(corpus["eval"])],
        tokenizer=str(tokenizer_path),
        seq_len=SEQ_LEN,
    )
    base.update(kw)
    return TextDataConfig(**base)


def _encode_docs(sp, docs, bos=True, eos=True) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += ([sp.bos_id()] if bos else []) + sp.encode(d) + ([sp.eos_id()] if eos else [])
    return out


def _rows(batches) -> np.ndarray:
    return np.concatenate([b["tokens"] for b in batches], axis=0)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def test_corpus_deterministic_and_structured(tmp_path):
    a = generate_documents(400, seed=3)
    assert a == generate_documents(400, seed=3)
    assert a != generate_documents(400, seed=4)
    assert len(set(a)) > 390  # not a handful of repeated lines
    text = " ".join(a)

    def num(w):
        return WORDS_TO_NUMBER[w.lower()]

    word = r"([Oo]ne hundred|[A-Za-z]+(?:-[a-z]+)?)"
    facts = 0
    for x, op, y, z in re.findall(rf"\b{word} (plus|minus|times) {word} is {word}\.", text):
        expect = {"plus": num(x) + num(y), "minus": num(x) - num(y), "times": num(x) * num(y)}[op]
        assert num(z) == expect, (x, op, y, z)
        facts += 1
    for x, op, y, z in re.findall(r"\b(\d+) ([-+*]) (\d+) = (\d+)\.", text):
        assert int(z) == eval(f"{x}{op}{y}")
        facts += 1
    assert facts > 50

    counts = 0
    for start, seq in re.findall(r"Let us count from ([a-z-]+ ?[a-z]*): ([a-z ,-]+)\.", text):
        values = [num(w.strip()) for w in seq.split(",")]
        assert values[0] == num(start) and values == list(range(values[0], values[0] + len(values)))
        counts += 1
    for seq in re.findall(r"Counting down from [a-z -]+: ([a-z ,-]+)\.", text):
        values = [num(w.strip()) for w in seq.split(",")]
        assert values == list(range(values[0], values[0] - len(values), -1))
        counts += 1
    assert counts > 10

    for what, names in (("day", DAYS), ("month", MONTHS)):
        for x, y in re.findall(rf"The {what} after (\w+) is (\w+)\.", text):
            assert names[(names.index(x) + 1) % len(names)] == y

    # Stories keep a character's pronoun: "... a girl named Anna. ... There she found ..."
    stories = 0
    for kind, pron in re.findall(r"a \w+ (girl|boy) named \w+\. On \w+, \w+ went to the \w+\. There (she|he) found", text):
        assert pron == {"girl": "she", "boy": "he"}[kind]
        stories += 1
    assert stories > 50

    paths = write_corpus(tmp_path, train_docs=50, eval_docs=7, seed=1)
    train = paths["train"].read_text().splitlines()
    evals = paths["eval"].read_text().splitlines()
    assert len(train) == 50 and len(evals) == 7 and all(train) and not set(train) & set(evals)
    assert train == generate_documents(50, seed=1, stream="train")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_train_and_round_trip(sp, corpus, tmp_path):
    assert sp.vocab_size() == 320
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)  # as Kyutai's: PAD 3 reserved
    docs = corpus["eval"].read_text().splitlines()[:50]
    for d in docs:
        ids = sp.encode(d)
        assert 0 not in ids  # the corpus is fully covered, no <unk>
        assert sp.decode(ids) == d
        assert 3 not in ids  # no word encodes to Moshi's text PAD
    assert np.mean([len(sp.encode(d)) / len(d) for d in docs]) < 0.5  # real merges, not chars

    # BPE on a .jsonl input (field "text"), plus a .txt
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    bpe = load_tokenizer(train_tokenizer([jl, corpus["eval"]], tmp_path / "bpe", 200, model_type="bpe"))
    assert bpe.vocab_size() == 200 and bpe.decode(bpe.encode(docs[0])) == docs[0]

    with pytest.raises(DataError, match="not found"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "x", 100)
    with pytest.raises(DataError, match="Vocabulary size too high"):
        train_tokenizer([jl], tmp_path / "big", 50_000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}:2: no field 'text' in the JSON record$"):
        train_tokenizer([bad], tmp_path / "bad", 10)
    assert not (tmp_path / "bad.model").exists()

    # Same inputs and seed: the same vocabulary (the file also records the output prefix).
    again = load_tokenizer(train_tokenizer([jl, corpus["eval"]], tmp_path / "bpe2", 200, model_type="bpe"))
    pieces = [(bpe.id_to_piece(i), bpe.get_score(i)) for i in range(bpe.vocab_size())]
    assert pieces == [(again.id_to_piece(i), again.get_score(i)) for i in range(again.vocab_size())]


def test_load_tokenizer_errors(tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(DataError, match=f"tokenizer file not found: {re.escape(str(missing))} \\(download Kyutai's "
                                        "tokenizer_spm_32k_3.model .* or train one: moshax tokenizer train"):
        load_tokenizer(missing)
    # from a config: the message names the key to set
    with pytest.raises(DataError, match=f"tokenizer file not found: {re.escape(str(missing))} \\(set data.tokenizer "
                                        "to a sentencepiece .model: download Kyutai's"):
        load_tokenizer(missing, key="data.tokenizer")
    for empty in ("", None):
        with pytest.raises(DataError, match="^data.tokenizer is not set: name a sentencepiece .model "
                                            "\\(download Kyutai's tokenizer_spm_32k_3.model .*moshax tokenizer train"):
            load_tokenizer(empty, key="data.tokenizer")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(DataError, match=f"not a sentencepiece model: {re.escape(str(garbage))}$") as e:
        load_tokenizer(garbage)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tokenizer, expect", [
    ("", "moshax: error: data.tokenizer is not set: name a sentencepiece .model (download Kyutai's "
         "tokenizer_spm_32k_3.model from their Hugging Face repos (e.g. kyutai/moshiko-pytorch-bf16) or train one: "
         "moshax tokenizer train"),
    ("missing.model", "moshax: error: tokenizer file not found: missing.model (set data.tokenizer to a sentencepiece "
                      ".model: download Kyutai's tokenizer_spm_32k_3.model"),
])
def test_missing_tokenizer_names_the_key(corpus, tmp_path, capsys, monkeypatch, tokenizer, expect):
    """`moshax data tokenize` / `moshax train` on a config without a usable tokenizer: one line that
    names data.tokenizer and says how to get one (it said "tokenizer file not found: ." before)."""
    from moshax.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"base: {ROOT / 'configs' / 'helium_tiny.yaml'}\n"
                   f"data: {{train_sources: [{corpus['train']}], eval_sources: [], tokenizer: '{tokenizer}'}}\n")
    for argv in (["data", "tokenize", "--config", str(cfg), "--output", str(tmp_path / "shards")],
                 ["train", "--config", str(cfg), "--workdir", str(tmp_path / "run")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(expect), (argv, err)
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_text_and_jsonl_sources(tmp_path, monkeypatch):
    txt = tmp_path / "a.txt"
    txt.write_bytes("first doc\n\n   \n  second doc  \r\n\t\nthird é doc".encode())
    src = TextFileSource(txt)
    assert len(src) == 3 and [src[i] for i in range(3)] == ["first doc", "second doc", "third é doc"]

    # The chunked line index agrees with a plain split for any chunk boundary.
    body = b"".join(rng_line + b"\n" for rng_line in [b"x" * (i % 5) + b" " * (i % 3) for i in range(60)])
    (tmp_path / "b.txt").write_bytes(body)
    expect = [ln.strip().decode() for ln in body.split(b"\n") if ln.strip()]
    for chunk in (1, 3, 7, 1 << 22):
        monkeypatch.setattr(text_sources, "_CHUNK", chunk)
        idx = index_lines(tmp_path / "b.txt")
        assert [body[s:e].strip().decode() for s, e in idx] == expect
    monkeypatch.undo()

    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "j one", "n": 1}\n\n{"text": "j two", "body": "x"}\n')
    assert list(JsonlSource(jl, "text")) == ["j one", "j two"]
    with pytest.raises(DataError, match=f"{re.escape(str(jl))}:1: no field 'body'"):
        JsonlSource(jl, "body")
    assert open_text_source(jl, jsonl_field="n")[0] == "1"

    both = open_text_sources([str(txt), str(jl)])
    assert len(both) == 5 and both[3] == "j one" and both[4] == "j two"
    with pytest.raises(IndexError):
        both[5]

    sub = tmp_path / "sub"
    sub.mkdir()
    for i in range(3):
        (sub / f"part{i}.txt").write_text(f"doc {i}a\ndoc {i}b\n")
    g = open_text_source(str(sub / "*.txt"))
    assert [g[i] for i in range(len(g))] == ["doc 0a", "doc 0b", "doc 1a", "doc 1b", "doc 2a", "doc 2b"]
    assert len(open_text_source(str(tmp_path / "**" / "*.txt"))) == 3 + len(expect) + 6  # recursive glob

    # Pickles without its file descriptor and still reads (Grain worker processes).
    import pickle

    assert pickle.loads(pickle.dumps(src))[1] == "second doc"

    for bad, msg in [
        (tmp_path / "nope.txt", "text source not found: "),
        (tmp_path / "none" / "*.jsonl", "no files match text source glob: "),
        (sub, "text source is a directory: "),
    ]:
        with pytest.raises(DataError, match=re.escape(msg + str(bad))):
            open_text_source(str(bad))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported text source file type"):
        open_text_source(tmp_path / "x.csv")


def _tiny_tfds_builder(tfds):
    """A tiny TFDS dataset prepared without TensorFlow (array_record format); defining the class
    registers ``moshax_tiny_text`` with TFDS."""

    class MoshaxTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "idx": np.int64}),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", 40), "validation": self._generate_examples("val", 12)}

        def _generate_examples(self, prefix, n):
            for i in range(n):
                yield i, {"text": f"{prefix} document {i}: Monday comes before Tuesday.", "idx": i}

    return MoshaxTinyText


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = require_module("tensorflow_datasets", "tfds: sources need the tfds extra (pip install '.[tfds]')")
    data_dir = tmp_path_factory.mktemp("tfds")
    _tiny_tfds_builder(tfds)(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_missing_is_one_line(monkeypatch):
    """Without the tfds extra a ``tfds:`` source is one DataError line that names the extra."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(DataError, match=r"tfds:some_set: TFDS sources need tensorflow-datasets.*pip install 'moshax\[tfds\]'") as e:
        open_text_source("tfds:some_set")
    assert "\n" not in str(e.value)


def test_tfds_source(tfds_dir, corpus, tokenizer_path, sp):
    assert parse_tfds_spec("tfds:a_b/cfg:1.2.3:train[:50%]") == ("a_b/cfg:1.2.3", "train[:50%]")
    assert parse_tfds_spec("tfds:a_b") == ("a_b", None)

    kw = dict(tfds_data_dir=str(tfds_dir))
    train = open_text_source("tfds:moshax_tiny_text:train", **kw)
    assert len(train) == 40
    docs = {train[i] for i in range(40)}
    assert docs == {f"train document {i}: Monday comes before Tuesday." for i in range(40)}
    assert all(isinstance(d, str) for d in docs)
    # No split: train for training, validation for eval; TFDS slicing syntax works.
    assert len(open_text_source("tfds:moshax_tiny_text", **kw)) == 40
    val = open_text_source("tfds:moshax_tiny_text", split="eval", **kw)
    assert len(val) == 12 and val[0].startswith("val document")
    assert len(open_text_source("tfds:moshax_tiny_text:1.0.0:train[:25%]", **kw)) == 10

    with pytest.raises(DataError, match="tfds:moshax_tiny_text:train: no feature 'body'"):
        open_text_source("tfds:moshax_tiny_text:train", jsonl_field="body", **kw)
    with pytest.raises(DataError, match="tfds:no_such_dataset_xyz: unknown TFDS dataset"):
        open_text_source("tfds:no_such_dataset_xyz", **kw)
    with pytest.raises(DataError, match="tfds:moshax_tiny_text:test: cannot read split 'test'"):
        open_text_source("tfds:moshax_tiny_text:test", **kw)
    with pytest.raises(DataError, match="not prepared"):
        open_text_source("tfds:moshax_tiny_text", tfds_data_dir=str(tfds_dir / "empty"))

    # Through the loader, mixed with a text file.
    cfg = _cfg(corpus, tokenizer_path, eval_sources=["tfds:moshax_tiny_text"], tfds_data_dir=str(tfds_dir))
    rows = _rows(make_text_iterator(cfg, split="eval", global_batch_size=2, seed=0))
    flat = _encode_docs(sp, [val[i] for i in range(len(val))])
    n = len(flat) // (SEQ_LEN + 1) // 2 * 2
    assert rows.shape == (n, SEQ_LEN + 1)
    np.testing.assert_array_equal(rows.reshape(-1), flat[: rows.size])

    # A process that never imported the builder class reads it from the files alone.
    code = (
        "import sys; from data_pipeline.text_sources import open_text_source as o; "
        f"s = o('tfds:moshax_tiny_text:validation', tfds_data_dir={str(tfds_dir)!r}); print(len(s), s[0])"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2].startswith("12 val document")


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def test_eval_pipeline_packs_in_order_and_is_finite(corpus, tokenizer_path, sp):
    cfg = _cfg(corpus, tokenizer_path)
    batches = list(make_text_iterator(cfg, split="eval", global_batch_size=4, seed=0))
    assert batches and all(set(b) == {"tokens"} for b in batches)
    for b in batches:
        assert b["tokens"].shape == (4, SEQ_LEN + 1) and b["tokens"].dtype == np.int32
    rows = _rows(batches)
    docs = corpus["eval"].read_text().splitlines()
    flat = _encode_docs(sp, docs)
    n_rows = len(flat) // (SEQ_LEN + 1)
    assert len(rows) == n_rows // 4 * 4  # one pass; partial row and partial batch dropped
    np.testing.assert_array_equal(rows.reshape(-1), flat[: rows.size])
    assert rows[0, 0] == sp.bos_id() and (rows == sp.eos_id()).sum() > 5
    assert rows.max() < sp.vocab_size() and rows.min() >= 0

    # Without BOS/EOS the stream is just the encoded documents back to back.
    cfg2 = _cfg(corpus, tokenizer_path, add_bos=False, add_eos=False)
    rows2 = _rows(make_text_iterator(cfg2, split="eval", global_batch_size=4, seed=0))
    np.testing.assert_array_equal(rows2.reshape(-1), _encode_docs(sp, docs, False, False)[: rows2.size])


def test_train_pipeline_shuffles_repeats_and_matches_tokens(corpus, tokenizer_path, sp):
    cfg = _cfg(corpus, tokenizer_path)
    docs_ds = document_dataset(cfg, split="train", seed=7)
    ordered = [docs_ds[i] for i in range(360)]  # three epochs of 120 documents
    plain = corpus["eval"].read_text().splitlines()
    assert sorted(ordered[:120]) == sorted(plain) and ordered[:120] != plain  # a shuffled epoch
    assert ordered[:120] != ordered[120:240]  # reshuffled each epoch

    it = make_text_iterator(cfg, split="train", global_batch_size=8, seed=7)
    rows = _rows([next(it) for _ in range(100)])  # more tokens than one epoch: it repeats
    flat = _encode_docs(sp, ordered)
    assert rows.size < len(flat)
    np.testing.assert_array_equal(rows.reshape(-1), flat[: rows.size])
    other = _rows([next(make_text_iterator(cfg, split="train", global_batch_size=8, seed=8))])
    assert not np.array_equal(other, rows[:8])


def test_process_sharding(corpus, tokenizer_path, sp):
    cfg = _cfg(corpus, tokenizer_path)
    all_docs = corpus["eval"].read_text().splitlines()
    shards = [list(document_dataset(cfg, split="eval", seed=0, process_index=p, process_count=2)) for p in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(all_docs)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    train_shards = [
        {d for d, _ in zip(document_dataset(cfg, split="train", seed=0, process_index=p, process_count=2), range(60))}
        for p in range(2)
    ]
    assert train_shards[0] == set(shards[0]) and train_shards[1] == set(shards[1])

    for p in range(2):
        batches = list(make_text_iterator(cfg, split="eval", global_batch_size=4, seed=0, process_index=p, process_count=2))
        assert batches[0]["tokens"].shape == (2, SEQ_LEN + 1)  # local batch = global / processes
        rows = _rows(batches)
        np.testing.assert_array_equal(rows.reshape(-1), _encode_docs(sp, shards[p])[: rows.size])

    with pytest.raises(DataError, match="global batch size 5 is not divisible by the process count 2"):
        build_text_dataset(cfg, split="train", global_batch_size=5, seed=0, process_index=0, process_count=2)


def test_exact_resume_from_state(corpus, tokenizer_path):
    cfg = _cfg(corpus, tokenizer_path)
    for split in ("train", "eval"):
        it = make_text_iterator(cfg, split=split, global_batch_size=4, seed=3)
        for _ in range(5):
            next(it)
        state = it.get_state()
        json.dumps(state)  # plain data: Orbax/JSON friendly
        expect = [next(it)["tokens"] for _ in range(6)]
        fresh = make_text_iterator(cfg, split=split, global_batch_size=4, seed=3)
        fresh.set_state(state)
        for e in expect:
            np.testing.assert_array_equal(next(fresh)["tokens"], e)


def test_grain_workers(corpus, tokenizer_path):
    """cfg.num_workers > 0: the pipeline pickles into spawned worker processes and resumes."""
    cfg = _cfg(corpus, tokenizer_path, num_workers=1)
    it = make_text_iterator(cfg, split="train", global_batch_size=4, seed=0)
    try:
        first = [next(it)["tokens"].copy() for _ in range(3)]
        state = it.get_state()
        expect = [next(it)["tokens"].copy() for _ in range(2)]
    finally:
        it.close()
    assert first[0].shape == (4, SEQ_LEN + 1) and first[0].dtype == np.int32
    # One worker reads the same documents in the same order as the in-process pipeline.
    inproc = make_text_iterator(_cfg(corpus, tokenizer_path), split="train", global_batch_size=4, seed=0)
    np.testing.assert_array_equal(next(inproc)["tokens"], first[0])
    it2 = make_text_iterator(cfg, split="train", global_batch_size=4, seed=0)
    try:
        it2.set_state(state)
        for e in expect:
            np.testing.assert_array_equal(next(it2)["tokens"], e)
    finally:
        it2.close()


def test_loader_errors(corpus, tokenizer_path, tmp_path):
    good = _cfg(corpus, tokenizer_path)
    with pytest.raises(DataError, match="data.eval_sources is empty"):
        build_text_dataset(_cfg(corpus, tokenizer_path, eval_sources=[]), split="eval", global_batch_size=2, seed=0)
    with pytest.raises(DataError, match="tokenizer file not found"):
        build_text_dataset(_cfg(corpus, tokenizer_path, tokenizer=str(tmp_path / "t.model")), split="train", global_batch_size=2, seed=0)
    with pytest.raises(DataError, match="text source not found"):
        build_text_dataset(_cfg(corpus, tokenizer_path, train_sources=[str(tmp_path / "a.txt")]), split="train", global_batch_size=2, seed=0)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="has no documents"):
        build_text_dataset(_cfg(corpus, tokenizer_path, train_sources=[str(tmp_path / "empty.txt")]), split="train", global_batch_size=2, seed=0)
    with pytest.raises(DataError, match="split='test'"):
        build_text_dataset(good, split="test", global_batch_size=2, seed=0)
    assert isinstance(build_text_dataset(good, split="train", global_batch_size=2, seed=0), grain.IterDataset)
