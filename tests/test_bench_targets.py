"""bench/targets.py: the table of every CPU speed target, and its runner (child processes, logs,
summary.json), on stand-in bench scripts (the real ones take minutes; their figures are in docs)."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def targets():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_targets", ROOT / "bench" / "targets.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through it
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_targets", None)
        sys.path.remove(str(ROOT / "bench"))


def test_evaluate_compares_each_figure_with_its_bound(targets):
    results = {"mimi": {"figures": {"batch_encode_ratio": 1.49, "stream_p50_ms": 40.0, "stream_reference_p50_ms": 90.0},
                        "load_start": 0.5, "load_end": 1.25}}
    rows = {r["target"]: r for r in targets.evaluate(results)}
    enc = rows["full Mimi batch encode (10 s), vs the reference"]
    assert enc["met"] is False and enc["value"] == 1.49 and enc["bound"] == ">= 1.5x"
    stream = rows["streaming Mimi encode + decode per frame, p50"]
    assert stream["met"] is True and stream["reference"] == 90.0 and stream["load"] == "0.50 -> 1.25"
    loop = rows["full duplex loop per frame, p50"]
    assert loop["met"] is None and loop["value"] is None  # bench not run
    text = targets.table(list(rows.values()))
    assert "| full Mimi batch encode (10 s), vs the reference | 1.49x | - | >= 1.5x | no |" in text
    assert "| 40.0 ms | 90.0 ms | <= 40 ms | **yes** |" in text
    assert text.count("not run") == len(targets.TARGETS) - 2


def test_every_target_names_a_bench_that_writes_json(targets):
    names = {b.name: b for b in targets.BENCHES}
    for t in targets.TARGETS:
        assert t.bench in names and t.op in targets.OPS
    for bench in targets.BENCHES:
        tree = ast.parse((ROOT / "bench" / bench.script).read_text())
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert {"add_json_option", "write_figures"} <= called, bench.script


def test_write_figures_records_the_load(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from common import write_figures
    finally:
        sys.path.remove(str(ROOT / "bench"))
    write_figures(None, {"x": 1}, (0.0, 0.0, 0.0))  # no --json: nothing written, no error
    path = tmp_path / "f.json"
    write_figures(str(path), {"stream_p50_ms": 12.5, "n": 3}, (0.25, 0.0, 0.0))
    out = json.loads(path.read_text())
    assert out["figures"] == {"stream_p50_ms": 12.5, "n": 3.0} and out["load_start"] == 0.25
    assert isinstance(out["load_end"], float) and "family" in out["cpu"]


def test_runner_collects_figures_and_reports_a_failed_bench(targets, tmp_path, capsys):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bench_mimi.py").write_text(textwrap.dedent("""
        import argparse, json, sys
        ap = argparse.ArgumentParser(); ap.add_argument("--json"); ap.add_argument("--repeats")
        ap.add_argument("--frames"); ap.add_argument("--warmup-frames")
        a = ap.parse_args()
        assert a.repeats == "3", "the quick arguments reach the bench"
        print("mimi bench output")
        json.dump({"figures": {"batch_encode_ratio": 2.0, "stream_p50_ms": 50.0}, "load_start": 0.1, "load_end": 0.2},
                  open(a.json, "w"))
    """))
    (scripts / "bench_generate.py").write_text("import sys\nprint('the reference worker died')\nsys.exit(3)\n")
    out = tmp_path / "out"
    rc = targets.main(["--only", "mimi,generate", "--quick", "--out", str(out), "--scripts", str(scripts)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "bench_generate.py failed (exit 3)" in printed and "the reference worker died" in printed
    assert "1 of 4 targets met (quick run); failed: bench_generate.py" in printed
    assert "mimi bench output" in (out / "mimi.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["bench_generate.py"] and summary["quick"] is True and summary["cpu"]
    met = {r["target"]: r["met"] for r in summary["rows"]}
    assert met["full Mimi batch encode (10 s), vs the reference"] is True
    assert met["streaming Mimi encode + decode per frame, p50"] is False
    assert met["full duplex loop per frame, p50"] is None
    assert len(summary["rows"]) == 4  # only the selected benches' targets


def test_unknown_bench_or_a_file_for_out_is_a_usage_error(targets, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        targets.main(["--only", "mimi,speed"])
    assert e.value.code == 2 and "unknown bench speed" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(SystemExit) as e:
        targets.main(["--only", "mimi", "--out", str(tmp_path / "notes.txt")])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "kept"


def test_ctrl_c_is_one_line_and_keeps_the_finished_benches(targets, tmp_path, capsys, monkeypatch):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bench_mimi.py").write_text(
        "import json, sys\njson.dump({'figures': {}, 'load_start': 0, 'load_end': 0}, open(sys.argv[-1], 'w'))\n")
    real_call = targets.subprocess.call

    def call(argv, **kw):  # the second bench is interrupted (Ctrl-C reaches the runner's wait)
        if argv[1].endswith("bench_generate.py"):
            raise KeyboardInterrupt
        return real_call(argv, **kw)

    monkeypatch.setattr(targets.subprocess, "call", call)
    rc = targets.main(["--only", "mimi,generate", "--out", str(tmp_path / "out"), "--scripts", str(scripts)])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted during bench_generate.py" in err and "Traceback" not in err
    assert json.loads((tmp_path / "out" / "mimi.json").read_text())["figures"] == {}
