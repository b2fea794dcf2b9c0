"""ArrayRecord token shards: writer + manifest, integrity checks, the elastic multi-host loader."""

import json

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.records import decode_array, encode_array
from data_pipeline.shard_loader import make_shard_iterator
from data_pipeline.token_shards import ShardWriter, iter_records, read_manifest


def _write(path, n=50, per_shard=16, width=9):
    rows = np.arange(n * width, dtype=np.int32).reshape(n, width)
    with ShardWriter(path, records_per_shard=per_shard, metadata={"tokenizer": {"vocab_size": 7}}) as w:
        for r in rows:
            w.write(r)
    return rows


def test_records_are_npy_without_pickle():
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.testing.assert_array_equal(decode_array(encode_array(a)), a)
    with pytest.raises(DataError, match="not a numpy record"):
        decode_array(b"garbage")
    # an object array record must not unpickle
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a numpy record: Object arrays cannot be loaded when allow_pickle=False"):
        decode_array(buf.getvalue())


def test_writer_manifest_and_roundtrip(tmp_path):
    rows = _write(tmp_path / "s")
    m = read_manifest(tmp_path / "s", verify=True)
    assert m["total_records"] == 50 and [s["records"] for s in m["shards"]] == [16, 16, 16, 2]
    assert m["record"] == {"dtype": "int32", "shape": [9]} and m["tokenizer"]["vocab_size"] == 7
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    np.testing.assert_array_equal(np.stack(list(iter_records(tmp_path / "s"))), rows)
    with pytest.raises(DataError, match="already holds token shards"):
        ShardWriter(tmp_path / "s")


def test_corrupt_or_missing_shards_are_named(tmp_path):
    _write(tmp_path / "s")
    shard = tmp_path / "s" / "tokens-00001.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="tokens-00001.array_record: sha256 does not match"):
        read_manifest(tmp_path / "s", verify=True)
    shard.unlink()
    with pytest.raises(DataError, match="shard tokens-00001.array_record listed in the manifest is missing"):
        read_manifest(tmp_path / "s")
    with pytest.raises(DataError, match="manifest.json missing"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="unknown format"):
        read_manifest(tmp_path / "bad")


def test_elastic_iterator_splits_and_resumes_across_process_counts(tmp_path):
    rows = _write(tmp_path / "s", n=40)
    one = make_shard_iterator(tmp_path / "s", split="train", global_batch_size=4, seed=1)
    global_batches = [next(one)["tokens"] for _ in range(6)]
    # every epoch is a permutation of all rows
    seen = np.concatenate(global_batches + [next(one)["tokens"] for _ in range(4)])
    assert sorted(map(tuple, seen[:40].tolist())) == sorted(map(tuple, rows.tolist()))

    # two processes: each reads its half of every global batch
    two = [make_shard_iterator(tmp_path / "s", split="train", global_batch_size=4, seed=1,
                               process_index=p, process_count=2) for p in range(2)]
    for want in global_batches[:3]:
        got = [next(it)["tokens"] for it in two]
        assert {tuple(r) for g in got for r in g.tolist()} == {tuple(r) for r in want.tolist()}
    # the position is global: a 2-process state resumes a 1-process iterator and vice versa
    state = two[0].get_state()
    assert state == two[1].get_state()
    fresh = make_shard_iterator(tmp_path / "s", split="train", global_batch_size=4, seed=1)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["tokens"], global_batches[3])


def test_eval_split_is_one_ordered_pass(tmp_path):
    rows = _write(tmp_path / "s", n=10)
    it = make_shard_iterator(tmp_path / "s", split="eval", global_batch_size=4, seed=0)
    got = [b["tokens"] for b in it]
    assert len(got) == 2
    np.testing.assert_array_equal(np.concatenate(got), rows[:8])


def test_tokenize_command_and_training_on_shards(tmp_path):
    from data_pipeline.corpus import write_corpus
    from data_pipeline.tokenizer import train_tokenizer
    from moshax.cli import main

    paths = write_corpus(tmp_path, train_docs=200, eval_docs=10, seed=2)
    tok = train_tokenizer([paths["train"]], tmp_path / "spm", 128)
    common = ["model.vocab_size=128", f"data.tokenizer={tok}", f"data.train_sources=[{paths['train']}]",
              "data.seq_len=32", "model.transformer.num_layers=1", "model.transformer.dim=32",
              "model.transformer.hidden_dim=64", "model.transformer.num_heads=2"]
    assert main(["data", "tokenize", "--config", "configs/helium_tiny.yaml", "--output", str(tmp_path / "sh"),
                 *common]) == 0
    m = read_manifest(tmp_path / "sh", verify=True)
    assert m["record"]["shape"] == [33] and m["tokenizer"]["vocab_size"] == 128
    assert m["stats"]["tokens"] - m["stats"]["dropped_tail_tokens"] == 33 * m["total_records"]
    assert main(["train", "--config", "configs/helium_tiny.yaml", "--workdir", str(tmp_path / "run"), *common,
                 f"data.train_shards={tmp_path / 'sh'}", "data.eval_sources=[]", "train.steps=3",
                 "train.progress=false", "checkpoint.every=3"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "3" / "data_elastic").exists()
    # rows of another length are refused in one line
    assert main(["train", "--config", "configs/helium_tiny.yaml", "--workdir", str(tmp_path / "run2"), *common,
                 f"data.train_shards={tmp_path / 'sh'}", "data.seq_len=16", "data.eval_sources=[]"]) == 2
