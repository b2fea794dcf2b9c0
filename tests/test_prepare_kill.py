"""Kill -9 during `moshax data prepare`, at several points, then rerun: the shards and manifest are
byte-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from test_prepare import _cfg, _files, _run, codec, env, prepared  # noqa: F401  (module fixtures)


def _argv(env, out):
    return [sys.executable, "-m", "moshax.cli", "data", "prepare", "--input", str(env["dialogues"]), "--output",
            str(out), "--mimi-checkpoint", env["mimi"], "--tokenizer", env["spm"], "--stereo-split",
            "--transcripts", str(env["dialogues"] / "truth"), "--files-per-shard", "2", "--no-progress",
            "record_seconds=8", "codec_batch_size=2", "codec_chunk_seconds=4"]


def _run_until(env, out, trigger, timeout=300.0) -> bool:
    """Start the job, SIGKILL it once ``trigger(out)`` holds; True if it was killed before finishing."""
    proc = subprocess.Popen(_argv(env, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if trigger(out):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


@pytest.mark.slow  # four job starts (~15 s each on 2 cores); CI's slow suite runs it
def test_kill_minus_nine_then_rerun_is_byte_identical(env, prepared, tmp_path):
    out = tmp_path / "killed"
    triggers = [
        lambda d: (d / "prepare.json").exists(),  # before any shard
        lambda d: any(p.name.endswith(".tmp") for p in d.iterdir()) if d.exists() else False,  # mid-write
        lambda d: (d / "tokens-00000.json").exists() and not (d / "tokens-00002.json").exists(),  # between shards
    ]
    killed = [_run_until(env, out, t) for t in triggers]
    assert sum(killed) >= 2, killed  # (a trigger can miss a very short window; most must hit)
    assert not (out / "manifest.json").exists() or not all(killed)
    proc = subprocess.run(_argv(env, out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _files(out) == _files(prepared)
