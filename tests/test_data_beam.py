"""`moshax data beam` + `moshax data tokenize-audio` (the fleet split of `moshax data prepare`):
the same shards and manifest as the local job, bad inputs through the errors side output, a
worker failing mid-bundle (retried by the runner, or the job killed and run again), tokenization
over two `jax.distributed` processes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("apache_beam")

from test_prepare import _bad_inputs, _cfg, _files, _run, codec, env, prepared  # noqa: F401,E402  (module fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _beam(cfg, runner="DirectRunner", beam_args=(), log=None):
    from data_pipeline.beam_prepare import run_beam

    return run_beam(cfg, runner=runner, beam_args=list(beam_args), log=log or (lambda m: None))


def _tokenize(segments, out, codec, **kw):
    from data_pipeline.tokenize_segments import run_tokenize

    return run_tokenize(str(segments), str(out), codec, progress=False, log=lambda m: None, **kw)


def _segment_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def segments(env):
    out = env["root"] / "segments"
    manifest = _beam(_cfg(env, out))
    assert manifest["stats"]["files"] == len(env["paths"]) and manifest["errors"] == []
    return out


def test_beam_then_tokenize_gives_the_shards_of_prepare(env, codec, prepared, segments, tmp_path):
    summary = _tokenize(segments, tmp_path / "tokens", codec)
    assert summary["manifest"] and summary["shards_written"] == 3
    assert _files(tmp_path / "tokens") == _files(prepared)  # records, metadata, summaries, manifest: same bytes
    # a rerun of either half changes nothing and redoes nothing
    before = _segment_files(segments)
    said = []
    _beam(_cfg(env, segments), log=said.append)
    assert _segment_files(segments) == before
    assert f"(0 files analysed by this run, {len(env['paths'])} finished before)" in said[-1]
    assert _tokenize(segments, tmp_path / "tokens", codec)["shards_written"] == 0


def test_segments_layout_and_refusals(env, codec, segments, tmp_path):
    from data_pipeline import segment_records as seg
    from data_pipeline.errors import DataError
    from data_pipeline.tokenize_segments import segments_config

    manifest = seg.read_manifest(str(segments))
    assert manifest["plan"]["files"] == len(env["paths"]) and manifest["plan"]["shards"] == 3
    lines = (segments / seg.PLAN).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(len(env["paths"])))
    index = seg.read_shard_index(str(segments), 1)
    assert [f["index"] for f in index["files"]] == [2, 3]
    result = seg.load_file_result(str(segments), seg.read_file_result(str(segments), 2))
    assert result.segments and result.segments[0].other is not None
    assert result.segments[0].main.dtype.name == "float32" and result.segments[0].text.dtype.name == "int32"
    # other CPU-stage settings into the same segments: refused in one line naming the key
    with pytest.raises(DataError, match="record_seconds"):
        _beam(_cfg(env, segments, record_seconds=4.0))
    # tokenize-audio may set only the codec's settings
    with pytest.raises(DataError, match="record_seconds: fixed by the beam job"):
        segments_config(manifest, {"record_seconds": 4.0})
    # a damaged segments file is found by its hash
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(segments, damaged)
    data = damaged / seg.file_stem(0)
    raw = bytearray(Path(f"{data}.array_record").read_bytes())
    raw[-40] ^= 0xFF
    Path(f"{data}.array_record").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256 differs"):
        _tokenize(damaged, tmp_path / "t2", codec)
    # an unfinished beam output
    (damaged / seg.MANIFEST).unlink()
    with pytest.raises(DataError, match="not a finished `moshax data beam` output"):
        _tokenize(damaged, tmp_path / "t3", codec)


@pytest.mark.slow  # a multi-process DirectRunner (worker start-up ~20 s) and a local prepare beside it
def test_bad_inputs_through_the_side_output_match_prepare(env, codec, tmp_path):
    """Every kind of bad input, with Beam's multi-process DirectRunner: the manifest's errors (and
    all the rest) equal the local job's."""
    expected = _bad_inputs(env, tmp_path / "in")
    kw = dict(inputs=[str(tmp_path / "in")], transcripts=str(tmp_path / "in" / "truth"), files_per_shard=4)
    assert _run(_cfg(env, tmp_path / "local", **kw), codec)["manifest"]
    manifest = _beam(_cfg(env, tmp_path / "segments", **kw),
                     beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert {Path(e["file"]).name for e in manifest["errors"]} == {n for n, s in expected.items() if s}
    assert _tokenize(tmp_path / "segments", tmp_path / "tokens", codec)["manifest"]
    assert _files(tmp_path / "tokens") == _files(tmp_path / "local")


def test_a_bundle_that_fails_mid_way_is_retried_without_duplicates(env, segments, tmp_path, monkeypatch):
    """The worker fails after writing a file's segments and before reporting it: the runner retries
    the bundle; the segments, indexes and manifest equal an undisturbed run's."""
    from data_pipeline.beam_prepare import FAULT_ENV

    out = tmp_path / "retried"
    monkeypatch.setenv(FAULT_ENV, f"raise:written:{tmp_path / 'fired'}")
    _beam(_cfg(env, out), runner="BundleBasedDirectRunner")
    assert (tmp_path / "fired").exists()
    assert _segment_files(out) == _segment_files(segments)


@pytest.mark.slow  # two job starts in subprocesses
def test_a_killed_worker_then_the_job_run_again_resumes_without_duplicates(env, segments, tmp_path):
    """A worker process of the multi-process DirectRunner dies mid-file (after analysing it, before
    its summary): the job fails with one line that says what is kept; the same command again
    finishes it; every file, index and the manifest equal an undisturbed run's."""
    from data_pipeline.beam_prepare import FAULT_ENV

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "moshax.cli", "data", "beam", "--input", str(env["dialogues"]), "--output",
            str(out), "--tokenizer", env["spm"], "--stereo-split", "--transcripts", str(env["dialogues"] / "truth"),
            "--files-per-shard", "2", "record_seconds=8", "codec_chunk_seconds=4", "codec_batch_size=2",
            f"mimi_checkpoint={env['mimi']}", "--", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    first = subprocess.run(argv, env={**os.environ, FAULT_ENV: f"kill:analyzed:{tmp_path / 'fired'}"},
                           capture_output=True, text=True, timeout=600)
    assert (tmp_path / "fired").exists()
    assert first.returncode != 0 and not (out / "segments.json").exists()
    assert "run the same command again" in first.stderr.strip().splitlines()[-1]
    done = len(list((out / "files").glob("*.json")))
    assert done < len(env["paths"])
    second = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert _segment_files(out) == _segment_files(segments)


def _tokenize_argv(segments, out, mimi, *extra):
    return [sys.executable, "-m", "moshax.cli", "data", "tokenize-audio", "--segments", str(segments), "--output",
            str(out), "--mimi-checkpoint", mimi, "--no-progress", "--codec-batch-size", "2", *extra]


@pytest.mark.slow  # two JAX processes, each compiling the tiny Mimi
def test_two_jax_processes_tokenize_disjoint_shards_and_merge_the_manifest(env, prepared, segments, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "tokens"
    procs = []
    for i in range(2):
        child_env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
        procs.append(subprocess.Popen(
            _tokenize_argv(segments, out, env["mimi"], "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                           "--process-id", str(i)),
            env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "process 0/2 writes 2" in logs[0] and "process 1/2 writes 1" in logs[1]
    assert _files(out) == _files(prepared)


def test_cli_one_line_errors(env, segments, tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "moshax.cli", "data", *argv], capture_output=True, text=True,
                              timeout=300)

    r = run("beam", "--input", str(env["dialogues"]), "--output", str(tmp_path / "s"), "--runner", "Nope")
    assert r.returncode != 0 and "--runner Nope" in r.stderr and "Traceback" not in r.stderr
    r = run("beam", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "s"))
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run(*_tokenize_argv(segments, tmp_path / "t", env["mimi"], "record_seconds=3")[4:])
    assert r.returncode != 0 and "fixed by the beam job" in r.stderr and "Traceback" not in r.stderr
    r = run(*_tokenize_argv(tmp_path / "nothing", tmp_path / "t", env["mimi"])[4:])
    assert r.returncode != 0 and "not a finished" in r.stderr and "Traceback" not in r.stderr


def test_encode_batch_over_local_devices_equals_one_device(env, codec):
    """Rows split across 4 local devices (weights replicated), `batch_size` rows on each: the
    codes of every signal equal the one-device run's."""
    import jax
    import numpy as np

    from moshax.commands.data_prepare import MimiTokenizer

    assert len(jax.local_devices()) >= 4
    multi = MimiTokenizer(env["mimi"], 8, chunk_seconds=4.0, devices=jax.local_devices()[:4])
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (24000, 50000, 7000, 96000, 30000)]
    one = codec.encode_batch(audios, batch_size=1)
    many = multi.encode_batch(audios, batch_size=1)
    assert [c.shape for c in many] == [c.shape for c in one]
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)
