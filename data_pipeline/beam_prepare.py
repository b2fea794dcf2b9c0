"""``moshax data beam``: the CPU stages of ``moshax data prepare`` as an Apache Beam pipeline.

The transforms call the very functions the local job runs (:class:`data_pipeline.analyze.FileAnalyzer`
and its stage functions, the models of :mod:`data_pipeline.stage_models`); what differs is who
schedules them. The launcher discovers the inputs and writes the static plan (``plan.jsonl``:
the same sorted order and shard assignment as ``prepare``); then::

    ReadFromText(plan.jsonl) -> Reshuffle -> AnalyzeFile  --(shard, file result)--> GroupByKey
                                               |                                  -> WriteShardIndex
                                               +--errors (side output)--> ToList ----+
                                                                                     v
                                                                     Finish: segments.json

``AnalyzeFile`` writes each file's segments and summary under names fixed by the plan (see
:mod:`data_pipeline.segment_records`): a bundle the runner retries, or a whole job run again,
rewrites the same bytes under the same names, and a file already finished is read back instead of
analysed again, so a rerun resumes. Failed files leave through the ``errors`` output and end in
``segments.json``'s ``errors`` and, after ``moshax data tokenize-audio``, in the token shards'
manifest.
"""

from __future__ import annotations

import logging
import os
import sys
import time

logging.disable(logging.WARNING)  # Beam's import warns about its GCP extras, which this job does not use
try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
finally:
    logging.disable(logging.NOTSET)

from data_pipeline import segment_records as seg
from data_pipeline import storage
from data_pipeline.analyze import FileAnalyzer
from data_pipeline.audio import AUDIO_EXTENSIONS, list_audio_files
from data_pipeline.errors import DataError
from data_pipeline.prepare import pipeline_settings, plan_identity, text_card, tokenizer_identity
from data_pipeline.prepare_config import PrepareConfig
from data_pipeline.prepare_plan import FileItem, plan_shards
from data_pipeline.prepared_shards import dumps

# Fault injection for the tests (see _maybe_fail).
FAULT_ENV = "MOSHAX_BEAM_FAULT"


def discover(specs: list[str]) -> list[str]:
    """Input files: local specs as ``prepare`` reads them; ``scheme://`` dirs and globs through
    Beam's filesystems (a directory is searched recursively)."""
    local = [s for s in specs if not storage.is_remote(s)]
    found = list_audio_files(local) if local else []
    for spec in specs:
        if not storage.is_remote(spec):
            continue
        from apache_beam.io.filesystems import FileSystems

        pattern = spec if any(c in spec for c in "*?[") else spec.rstrip("/") + "/**"
        matched = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list
                         if os.path.splitext(m.path)[1].lower() in AUDIO_EXTENSIONS)
        if not matched:
            raise DataError(f"audio source {spec} has no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        found += matched
    return found


def _maybe_fail(stage: str) -> None:
    """``MOSHAX_BEAM_FAULT=MODE:STAGE:MARKER`` (tests only): the first worker to reach ``STAGE``
    while ``MARKER`` does not exist creates it, then raises (``MODE=raise``: the runner retries the
    bundle) or dies on the spot (``MODE=kill``)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    mode, where, marker = spec.split(":", 2)
    if where != stage:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    if mode == "kill":
        os._exit(137)
    raise RuntimeError(f"injected fault at {stage}")


class AnalyzeFile(beam.DoFn):
    """FileItem -> (shard, the file's summary); the failed ones also to the ``errors`` output."""

    def __init__(self, cfg: PrepareConfig, components, root: str):
        self.cfg = cfg
        self.components = components
        self.root = root

    def setup(self):
        self.analyzer = FileAnalyzer(self.cfg, self.components)  # models load once per worker

    # the runner's counters (the Dataflow/Flink UIs show them live; run_beam prints them at the end)
    analysed = beam.metrics.Metrics.counter("moshax", "files_analysed")
    reused = beam.metrics.Metrics.counter("moshax", "files_finished_before")
    failed = beam.metrics.Metrics.counter("moshax", "files_failed")
    audio_ms = beam.metrics.Metrics.counter("moshax", "audio_milliseconds")

    def process(self, item: FileItem):
        summary = seg.read_file_result(self.root, item.index)
        if summary is None or (self.cfg.retry_errors and summary["error"]):
            with storage.local_copy(item.path) as local:
                result = self.analyzer(item, local_path=None if local == item.path else local)
            _maybe_fail("analyzed")
            summary = seg.write_file_result(self.root, result)
            _maybe_fail("written")
            self.analysed.inc()
        else:
            self.reused.inc()
        self.failed.inc(1 if summary["error"] else 0)
        self.audio_ms.inc(int(round(summary["duration"] * 1000)))
        brief = {k: summary[k] for k in ("index", "path", "records", "error", "duration", "speech_seconds")}
        if summary["error"]:
            yield beam.pvalue.TaggedOutput("errors", (item.index, summary["error"]))
        yield item.shard, brief


def write_shard_index(keyed, root: str) -> dict:
    """One planned shard's files, in input order; its totals for ``segments.json``."""
    shard, files = keyed
    summary = seg.shard_summary(shard, list(files))
    storage.write_text(seg.shard_index_path(root, shard), dumps(summary))
    fs = summary["files"]
    return {"shard": shard, "files": len(fs), "files_failed": sum(1 for f in fs if f["error"]),
            "records": sum(f["records"] for f in fs), "seconds_in": sum(f["duration"] for f in fs),
            "speech_seconds": sum(f["speech_seconds"] for f in fs if not f["error"])}


def finish(_, root: str, header: dict, shards: list[dict], errors: list) -> dict:
    """``segments.json``: written once every planned shard's index is."""
    planned = header["plan"]["shards"]
    done = sorted(s["shard"] for s in shards)
    if done != list(range(planned)):
        raise DataError(f"{len(done)} of {planned} shards indexed: the job lost work")
    stats = {"files": sum(s["files"] for s in shards), "files_failed": sum(s["files_failed"] for s in shards),
             "records": sum(s["records"] for s in shards),
             "hours_in": round(sum(s["seconds_in"] for s in shards) / 3600, 6),
             "speech_hours": round(sum(s["speech_seconds"] for s in shards) / 3600, 6)}
    manifest = {"format": seg.FORMAT, **header, "stats": stats, "errors": [e for _, e in sorted(errors)]}
    storage.write_text(storage.join(root, seg.MANIFEST), dumps(manifest))
    return stats


def header_for(cfg: PrepareConfig, components, plan) -> dict:
    """What ``tokenize-audio`` needs besides the segments (it has no access to the raw audio or
    the CPU stages' models), and the identity a rerun must match."""
    return {"config": pipeline_settings(cfg), "prepare": pipeline_settings(cfg, codec=False),
            "stages": components.identity(), "tokenizer": tokenizer_identity(cfg),
            "text_card": text_card(cfg), "plan": plan_identity(plan)}


def build_pipeline(p: beam.Pipeline, cfg: PrepareConfig, components, root: str, header: dict):
    plan_path = storage.join(root, seg.PLAN)
    items = (p
             | "ReadPlan" >> beam.io.ReadFromText(plan_path)
             | "ParsePlan" >> beam.Map(seg.parse_plan_line)
             | "Spread" >> beam.Reshuffle())
    out = items | "AnalyzeFile" >> beam.ParDo(AnalyzeFile(cfg, components, root)).with_outputs("errors", main="files")
    shards = (out.files
              | "ByShard" >> beam.GroupByKey()
              | "WriteShardIndex" >> beam.Map(write_shard_index, root)
              | "Shards" >> beam.combiners.ToList())
    errors = out.errors | "Errors" >> beam.combiners.ToList()
    return (p
            | "Start" >> beam.Create([None])
            | "Finish" >> beam.Map(finish, root, header, beam.pvalue.AsSingleton(shards),
                                   beam.pvalue.AsSingleton(errors)))


def run_beam(cfg: PrepareConfig, components=None, *, runner: str = "DirectRunner", beam_args: list[str] = (),
             log=None) -> dict:
    """Plan, then run the pipeline to the end; returns ``segments.json``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg.validate(codec=False)
    if components is None:
        from data_pipeline.stage_models import StageModels

        components = StageModels.from_config(cfg)
    root = cfg.output
    files = discover(cfg.inputs)
    plan = plan_shards(files, cfg.files_per_shard)
    header = header_for(cfg, components, plan)
    seg.check_identity(root, {k: header[k] for k in ("prepare", "stages", "tokenizer", "plan")})
    seg.write_plan(root, plan)
    log(f"beam: {len(files)} files in {len(plan)} shards -> {root} (runner {runner})")
    t0 = time.perf_counter()
    options = PipelineOptions(["--runner", runner, *beam_args])
    try:
        p = beam.Pipeline(options=options)
        build_pipeline(p, cfg, components, root, header)
        result = p.run()
        result.wait_until_finish()
    except Exception as e:  # noqa: BLE001 - a worker lost, a runner error: say what is kept and how to go on
        import traceback

        log(traceback.format_exc())
        done = sum(1 for s in plan for f in s.files if seg.read_file_result(root, f.index) is not None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"the beam job failed ({type(e).__name__}: {first}); {done} of {len(files)} files are "
                        "finished and kept: run the same command again to go on") from None
    manifest = seg.read_manifest(root)
    s = manifest["stats"]
    counts = _counters(result)
    log(f"beam: {s['hours_in'] * 60:.2f} min of audio, {s['records']} segments, {s['files_failed']} failed files "
        f"({counts.get('files_analysed', 0)} files analysed by this run, {counts.get('files_finished_before', 0)} "
        f"finished before); {time.perf_counter() - t0:.1f} s")
    return manifest


def _counters(result) -> dict[str, int]:
    """The job's ``moshax`` counters (committed values; runners that do not report them: {})."""
    try:
        found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace("moshax"))["counters"]
    except Exception:  # noqa: BLE001 - metrics are a convenience; a runner may not support the query
        return {}
    return {c.key.metric.name: int(c.committed or 0) for c in found}

