"""``moshax data inspect DIR``: what a shard directory holds, checked, and (``--decode N``) some
records turned back into something a person can listen to and read.

The report: the manifest's statistics (hours, records, speech/PAD ratios, failures by stage), the
models and settings that made it, every shard's sha256 verified. ``decode_records`` writes, per
record, ``record-XXXXX.wav`` (stereo: left = Moshi's stream, right = the user's, both decoded by
the codec) and ``record-XXXXX.txt`` (the text stream as words, and frame by frame with PAD as
``_`` and EPAD as ``|``). The codec is injected (``decode(codes [K, frames]) -> audio``), as in
:mod:`data_pipeline.prepare`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.token_shards import iter_records, read_manifest


def report(shard_dir: str | Path) -> list[str]:
    """Human-readable lines; raises :class:`DataError` if a shard is missing or corrupt."""
    manifest = read_manifest(shard_dir, verify=True)
    stats = manifest.get("stats", {})
    lines = [f"{shard_dir}: {manifest.get('kind')} shards, {manifest['total_records']} records in "
             f"{len(manifest['shards'])} shards (sha256 verified)"]
    spec = manifest.get("multistream")
    if spec:
        lines.append(f"  layout: {spec['num_streams']} streams ({spec['layout']}), text_card {spec['text_card']}, "
                     f"card {spec['card']}, {spec['frame_rate']} Hz")
    if "hours_in" in stats:
        lines.append(f"  audio: {stats['hours_in']:.4f} h in, {stats['hours_out']:.4f} h in records "
                     f"({stats['frames']} frames, longest record {stats['max_frames']})")
        lines.append(f"  speech ratio {stats['speech_ratio']:.1%}, text PAD ratio {stats['pad_ratio']:.1%}, "
                     f"EPAD {stats['epad_ratio']:.1%}")
        lines.append(f"  files: {stats['files']} in, {stats['files_failed']} failed "
                     f"({', '.join(f'{k} {v}' for k, v in stats['failed_by_stage'].items()) or 'none'})")
    for e in manifest.get("errors", [])[:20]:
        lines.append(f"  error [{e['stage']}] {e['reason']}")
    if len(manifest.get("errors", [])) > 20:
        lines.append(f"  ... {len(manifest['errors']) - 20} more errors in manifest.json")
    for key in ("codec", "tokenizer", "vad", "diarizer", "asr"):
        if manifest.get(key):
            lines.append(f"  {key}: {json.dumps(manifest[key], sort_keys=True)}")
    return lines


def _metadata(shard_dir: Path, manifest: dict) -> list[dict]:
    out = []
    for s in manifest["shards"]:
        meta = s.get("metadata")
        if meta and (shard_dir / meta).is_file():
            out.extend(json.loads(line) for line in (shard_dir / meta).read_text().splitlines())
        else:
            out.extend({} for _ in range(s["records"]))
    return out


def text_views(row: np.ndarray, tokenizer=None, pad: int = 3, epad: int = 0) -> tuple[str, str]:
    """(the words, the frame-by-frame view) of a text stream row."""
    frames = []
    for t in row.tolist():
        frames.append("_" if t == pad else "|" if t == epad else "." if t < 0 else
                      (tokenizer.id_to_piece(t) if tokenizer is not None else str(t)))
    ids = [t for t in row.tolist() if t >= 0 and t not in (pad, epad)]
    words = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
    return words, " ".join(frames)


def decode_records(shard_dir: str | Path, num: int, output: str | Path, codec, tokenizer=None) -> list[Path]:
    """Write the first ``num`` records as stereo wav + text (see the module docstring)."""
    from data_pipeline.audio import write_wav

    shard_dir, output = Path(shard_dir), Path(output)
    manifest = read_manifest(shard_dir)
    spec = manifest.get("multistream")
    if not spec:
        raise DataError(f"{shard_dir}: --decode needs multi-stream shards, these are {manifest.get('kind')!r}")
    k = spec["dep_q"]
    metas = _metadata(shard_dir, manifest)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for i, rec in enumerate(iter_records(shard_dir)):
        if i >= num:
            break
        channels = []
        for rows in (rec[1:1 + k], rec[1 + k:1 + 2 * k]):
            valid = (rows >= 0).all(axis=0)
            audio = codec.decode(np.where(rows >= 0, rows, 0))
            mask = np.repeat(valid, audio.shape[-1] // max(1, rows.shape[1]))
            channels.append(audio * mask[: audio.shape[-1]])
        wav = output / f"record-{i:05d}.wav"
        write_wav(wav, np.stack(channels), codec.sample_rate)
        words, frames = text_views(rec[0], tokenizer, spec["text_padding_id"], spec["text_end_padding_id"])
        meta = metas[i] if i < len(metas) else {}
        (output / f"record-{i:05d}.txt").write_text(
            f"source: {meta.get('source', '?')} @ {meta.get('offset', 0)} s, {rec.shape[1]} frames\n"
            f"words: {words}\nframes: {frames}\n", encoding="utf-8")
        written.append(wav)
    return written
