"""Speaker diarization: who speaks when, from voiced regions, speaker embeddings and clustering.

Steps, each simple on purpose (the dialogues we prepare for Moshi have a few speakers, little overlap):

1. Windows of ``window_seconds`` every ``hop_seconds`` inside each voiced region (a region shorter
   than a window is one window); each gets a GE2E embedding (:mod:`data_pipeline.speaker_embedding`).
2. Agglomerative clustering of the windows (cosine distance, average linkage): ``num_speakers``
   clusters when given, else clusters closer than ``cluster_threshold`` merge (at most
   ``max_speakers``).
3. Every 20 ms frame of a voiced region takes the speaker whose centroid the windows covering it
   are most similar to; runs shorter than ``min_turn_seconds`` join their neighbour (smoothing).
   Frames covered by windows of two different clusters, and ``CHANGE_MARGIN`` on each side of a
   change of speaker inside continuous speech, are marked as overlap.
4. Frames -> turns (one :class:`~data_pipeline.rttm.Turn` per run of a speaker inside a region).

``moshax data diarize AUDIO... [--output OUT.rttm]`` writes the turns as RTTM.
Heavy imports (onnxruntime, torch, scikit-learn) happen on use, not at import.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.rttm import Turn

FRAME = 0.02  # seconds per label frame
EMBED_RATE = 16000
CHANGE_MARGIN = 0.3  # seconds marked as overlap on each side of a speaker change inside speech


@dataclass
class DiarizationConfig:
    """How many speakers and how windows become turns."""

    num_speakers: int | None = None  # None: found by cluster_threshold (at most max_speakers)
    max_speakers: int = 4
    window_seconds: float = 1.5
    hop_seconds: float = 0.75
    # Automatic count (see _cluster): clusters whose centroids are closer than this cosine
    # distance are one speaker. Chosen with bench/bench_vad_diarize.py on espeak dialogues
    # (0.12-0.16 gave about the same DER; 0.18 merged distinct voices).
    cluster_threshold: float = 0.15
    split_threshold: float = 0.25  # first, over-clustering cut (average linkage, cosine)
    min_cluster_share: float = 0.1  # clusters with fewer windows join their nearest neighbour
    min_turn_seconds: float = 0.3
    main_speaker: str = "most_talk"  # or "random" (seeded)
    seed: int = 0

    def validate(self) -> "DiarizationConfig":
        if self.num_speakers is not None and self.num_speakers < 1:
            raise DataError(f"num_speakers={self.num_speakers}: must be >= 1 (or None: automatic)")
        if self.max_speakers < 1:
            raise DataError(f"max_speakers={self.max_speakers}: must be >= 1")
        if not 0.2 <= self.window_seconds <= 10.0:
            raise DataError(f"window_seconds={self.window_seconds}: must be between 0.2 and 10")
        if not 0.0 < self.hop_seconds <= self.window_seconds:
            raise DataError(f"hop_seconds={self.hop_seconds}: must be in (0, window_seconds={self.window_seconds}]")
        for name in ("cluster_threshold", "split_threshold"):
            if not 0.0 < getattr(self, name) < 2.0:
                raise DataError(f"{name}={getattr(self, name)}: a cosine distance in (0, 2)")
        if not 0.0 <= self.min_cluster_share < 0.5:
            raise DataError(f"min_cluster_share={self.min_cluster_share}: must be in [0, 0.5)")
        if self.min_turn_seconds < 0:
            raise DataError(f"min_turn_seconds={self.min_turn_seconds}: must be >= 0")
        if self.main_speaker not in ("most_talk", "random"):
            raise DataError(f"main_speaker={self.main_speaker!r}: 'most_talk' or 'random'")
        return self


@dataclass
class Diarization:
    """Turns (labels ``spk0``, ``spk1``... in order of first appearance), overlap regions, the main
    speaker and each speaker's talk time in seconds."""

    turns: list[Turn]
    overlap: list[tuple[float, float]] = field(default_factory=list)
    main_speaker: str = ""
    talk_time: dict[str, float] = field(default_factory=dict)

    @property
    def speakers(self) -> list[str]:
        return sorted(self.talk_time)


# ----------------------------------------------------------------------------- windows


def window_spans(regions: list[tuple[float, float]], window: float, hop: float) -> list[tuple[float, float]]:
    """Windows over the voiced regions: every ``hop`` from each region's start, the last one ending
    at the region's end; a region shorter than ``window`` is one window."""
    spans = []
    for start, end in regions:
        if end - start <= window:
            spans.append((start, end))
            continue
        t = start
        while t + window < end - 1e-9:
            spans.append((t, t + window))
            t += hop
        spans.append((end - window, end))
    return spans


def _cluster(emb: np.ndarray, cfg: DiarizationConfig) -> np.ndarray:
    """Cluster labels ``0..k-1`` of the window embeddings.

    Over-cluster first (average linkage, cosine, cut at ``split_threshold``), let clusters with
    under ``min_cluster_share`` of the windows join their nearest large one (odd windows: one
    short word, a speaker change inside a window), then merge the two clusters whose centroids
    are closest until ``num_speakers`` are left, or, automatic count, while they are closer than
    ``cluster_threshold`` (and more than ``max_speakers`` are left). Centroids
    are steadier than single windows: on espeak dialogues the centroids of two different voices
    were 0.15-0.30 apart, two halves of one voice's windows 0.03-0.13 (one 0.21)."""
    from sklearn.cluster import AgglomerativeClustering

    n = emb.shape[0]
    if n == 1:
        return np.zeros(1, int)
    k = cfg.num_speakers
    if k is not None and k >= n:
        return np.arange(n)
    labels = AgglomerativeClustering(n_clusters=None, distance_threshold=cfg.split_threshold, metric="cosine",
                                     linkage="average").fit_predict(emb)
    if k is not None and labels.max() + 1 < k:
        return AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(emb)
    labels = _absorb_small_clusters(emb, labels, cfg.min_cluster_share, keep=k or 1)
    if k is not None:
        return _merge_close_centroids(emb, labels, 0.0, k)
    return _merge_close_centroids(emb, labels, cfg.cluster_threshold, cfg.max_speakers)


def _centroids(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    c = np.stack([emb[labels == k].mean(axis=0) for k in range(int(labels.max()) + 1)])
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def _merge_close_centroids(emb: np.ndarray, labels: np.ndarray, threshold: float, max_clusters: int) -> np.ndarray:
    """Merge the closest pair of clusters (cosine distance of centroids) while it is closer than
    ``threshold`` or there are more than ``max_clusters``."""
    labels = np.unique(labels, return_inverse=True)[1]
    while labels.max() >= 1:
        c = _centroids(emb, labels)
        dist = 1.0 - c @ c.T
        np.fill_diagonal(dist, np.inf)
        a, b = np.unravel_index(np.argmin(dist), dist.shape)
        if dist[a, b] >= threshold and labels.max() + 1 <= max_clusters:
            break
        labels = np.unique(np.where(labels == b, a, labels), return_inverse=True)[1]
    return labels


def _absorb_small_clusters(emb: np.ndarray, labels: np.ndarray, min_share: float, keep: int = 1) -> np.ndarray:
    """Clusters holding less than ``min_share`` of the windows join the nearest large cluster
    (by centroid); at least the ``keep`` largest clusters stay. Labels come back 0..k-1."""
    sizes = np.bincount(labels)
    big = np.flatnonzero(sizes >= max(1.0, min_share * labels.size))
    if big.size < keep:
        big = np.sort(np.argsort(-sizes, kind="stable")[:keep])
    if big.size == 0 or big.size == sizes.size:
        return np.unique(labels, return_inverse=True)[1]
    centroids = np.stack([emb[labels == c].mean(axis=0) for c in big])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    out = labels.copy()
    small = ~np.isin(labels, big)
    out[small] = big[np.argmax(emb[small] @ centroids.T, axis=1)]
    return np.unique(out, return_inverse=True)[1]


def _smooth(labels: np.ndarray, min_frames: int) -> np.ndarray:
    """Runs shorter than ``min_frames`` take the label of their longer neighbour (-1 = unvoiced
    frames stay as they are and are never given to a run)."""
    labels = labels.copy()
    for _ in range(3):
        changes = np.flatnonzero(np.diff(labels)) + 1
        bounds = np.concatenate([[0], changes, [labels.size]])
        runs = [(int(a), int(b), int(labels[a])) for a, b in zip(bounds[:-1], bounds[1:])]
        changed = False
        for j, (a, b, lab) in enumerate(runs):
            if lab < 0 or b - a >= min_frames:
                continue
            left = runs[j - 1] if j > 0 and runs[j - 1][2] >= 0 else None
            right = runs[j + 1] if j + 1 < len(runs) and runs[j + 1][2] >= 0 else None
            pick = max((r for r in (left, right) if r), key=lambda r: r[1] - r[0], default=None)
            if pick is not None and pick[2] != lab:
                labels[a:b] = pick[2]
                changed = True
        if not changed:
            break
    return labels


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` frame runs where ``mask`` is true."""
    m = np.concatenate([[False], mask.astype(bool), [False]])
    d = np.flatnonzero(np.diff(m.astype(np.int8)))
    return list(zip(d[::2].tolist(), d[1::2].tolist()))


# ----------------------------------------------------------------------------- diarize


def diarize(audio: np.ndarray, sample_rate: int, regions: list[tuple[float, float]],
            cfg: DiarizationConfig | None = None, encoder=None) -> Diarization:
    """Speaker turns of mono ``audio`` inside voiced ``regions`` (seconds, e.g. from
    :class:`~data_pipeline.vad.SileroVad`). ``encoder``: a
    :class:`~data_pipeline.speaker_embedding.SpeakerEncoder` (one is made when None)."""
    from data_pipeline.audio import resample
    from data_pipeline.speaker_embedding import SpeakerEncoder, normalize_volume

    cfg = (cfg or DiarizationConfig()).validate()
    encoder = encoder or SpeakerEncoder()
    wav = np.asarray(audio, np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=0)
    duration = wav.size / sample_rate
    regions = [(max(0.0, s), min(duration, e)) for s, e in regions if min(duration, e) > max(0.0, s)]
    if not regions:
        return Diarization([], [], "", {})
    wav = normalize_volume(resample(wav, int(sample_rate), EMBED_RATE))
    spans = window_spans(regions, cfg.window_seconds, cfg.hop_seconds)
    samples = [(int(round(s * EMBED_RATE)), int(round(e * EMBED_RATE))) for s, e in spans]
    emb = encoder.embed_windows(wav, samples)
    labels = _cluster(emb, cfg)
    frame_labels, voiced, seen = _label_frames(spans, emb, labels, regions, duration, cfg.min_turn_seconds)
    turns = _turns(frame_labels, regions)
    overlap = _overlap(frame_labels, voiced, seen, duration)
    talk: dict[str, float] = {}
    for t in turns:
        talk[t.speaker] = talk.get(t.speaker, 0.0) + t.end - t.start
    talk = {n: round(v, 3) for n, v in talk.items()}
    return Diarization(turns, overlap, pick_main_speaker(talk, cfg), talk)


def _frame_span(s: float, e: float) -> tuple[int, int]:
    a = int(np.floor(s / FRAME))
    return a, max(int(np.ceil(e / FRAME)), a + 1)


def _label_frames(spans, emb, labels, regions, duration: float, min_turn_seconds: float):
    """Per 20 ms frame: the cluster the covering windows are most similar to on average (-1:
    unvoiced), smoothed; the voiced mask; and which clusters' windows cover each frame."""
    k = int(labels.max()) + 1
    sims = emb @ _centroids(emb, labels).T  # [windows, clusters]
    frames = int(np.ceil(duration / FRAME))
    score = np.zeros((frames, k), np.float32)
    cover = np.zeros(frames, np.int32)
    seen = np.zeros((frames, k), bool)
    for (s, e), sim, lab in zip(spans, sims, labels):
        a, b = _frame_span(s, e)
        score[a:b] += sim
        cover[a:b] += 1
        seen[a:b, lab] = True
    voiced = np.zeros(frames, bool)
    for s, e in regions:
        a, b = _frame_span(s, e)
        voiced[a:b] = True
    frame_labels = np.where(voiced & (cover > 0), score.argmax(axis=1), -1)
    return _smooth(frame_labels, max(1, int(round(min_turn_seconds / FRAME)))), voiced, seen


def _turns(frame_labels: np.ndarray, regions) -> list[Turn]:
    """Runs of one label inside each region; names ``spk0``, ``spk1``... in order of first talk."""
    order = [int(c) for c in dict.fromkeys(frame_labels[frame_labels >= 0].tolist())]
    names = {c: f"spk{i}" for i, c in enumerate(order)}
    turns = []
    for s, e in regions:
        a, b = _frame_span(s, e)
        for c in order:
            for ra, rb in _runs(frame_labels[a:b] == c):
                ts, te = max(s, (a + ra) * FRAME), min(e, (a + rb) * FRAME)
                if te > ts:
                    turns.append(Turn(round(ts, 3), round(te, 3), names[c]))
    return sorted(turns, key=lambda t: (t.start, t.end))


def _overlap(frame_labels: np.ndarray, voiced: np.ndarray, seen: np.ndarray, duration: float):
    """Voiced frames covered by windows of two clusters, or within ``CHANGE_MARGIN`` of a change
    of speaker with no pause between (continuous speech: both may be talking)."""
    both = voiced & (seen.sum(axis=1) >= 2)
    change = np.flatnonzero((frame_labels[1:] >= 0) & (frame_labels[:-1] >= 0)
                            & (frame_labels[1:] != frame_labels[:-1]))
    reach = int(round(CHANGE_MARGIN / FRAME))
    for i in change:
        both[max(0, i + 1 - reach):i + 1 + reach] = True
    return [(round(a * FRAME, 3), round(min(duration, b * FRAME), 3)) for a, b in _runs(voiced & both)]


def pick_main_speaker(talk_time: dict[str, float], cfg: DiarizationConfig) -> str:
    """The speaker with the most talk (ties: the first name), or a seeded random one."""
    if not talk_time:
        return ""
    names = sorted(talk_time)
    if cfg.main_speaker == "random":
        return random.Random(cfg.seed).choice(names)
    return max(names, key=lambda n: talk_time[n])


def split_streams(audio: np.ndarray, sample_rate: int, diarization: Diarization,
                  main: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(main_audio, other_audio)``, each the input gated by a binary activity mask: the main
    speaker's turns go to the main stream, every other speaker's turns to the other stream.
    Rule for overlap: a sample inside a marked overlap region that is in any turn goes to both
    streams (the moshi user stream must not lose the other voice, the main stream must not lose
    the main voice). Unvoiced samples are silent in both."""
    main = main or diarization.main_speaker
    a = np.asarray(audio, np.float32)
    n = a.shape[-1]

    def mask(pred) -> np.ndarray:
        m = np.zeros(n, bool)
        for t in diarization.turns:
            if pred(t.speaker):
                m[int(round(t.start * sample_rate)):int(round(t.end * sample_rate))] = True
        return m

    main_mask, other_mask = mask(lambda s: s == main), mask(lambda s: s != main)
    both = np.zeros(n, bool)
    for s, e in diarization.overlap:
        both[int(round(s * sample_rate)):int(round(e * sample_rate))] = True
    voiced = main_mask | other_mask
    main_mask |= both & voiced
    other_mask |= both & voiced
    return a * main_mask, a * other_mask


# ----------------------------------------------------------------------------- CLI


def add_diarize_arguments(p) -> None:
    """Flags of ``moshax data diarize``."""
    p.add_argument("audio", nargs="+", help="audio files, directories or globs")
    p.add_argument("--output", help="RTTM file to write (default: print RTTM to stdout)")
    p.add_argument("--num-speakers", type=int, default=None, help="speakers per file (default: automatic)")
    p.add_argument("--max-speakers", type=int, default=4)
    p.add_argument("--vad-threshold", type=float, default=0.5)


def diarize_file(path: str, cfg: DiarizationConfig, vad, encoder) -> Diarization:
    """Read one file (mono, 16 kHz), find its voiced regions, diarize them."""
    from data_pipeline.audio import read_audio

    audio = read_audio(path, EMBED_RATE)[0]
    return diarize(audio, EMBED_RATE, vad.regions(audio, EMBED_RATE), cfg, encoder)


def diarize_command(args) -> int:
    from data_pipeline.audio import list_audio_files
    from data_pipeline.rttm import write_rttm, format_rttm
    from data_pipeline.speaker_embedding import SpeakerEncoder
    from data_pipeline.vad import SileroVad, VadConfig

    cfg = DiarizationConfig(num_speakers=args.num_speakers, max_speakers=args.max_speakers).validate()
    vad = SileroVad(VadConfig(threshold=args.vad_threshold))
    encoder = SpeakerEncoder()
    encoder.weights  # noqa: B018 - a missing torch/resemblyzer fails once, before any file
    files, failed = [], 0
    for spec in args.audio:  # a missing input fails alone, like an unreadable file
        try:
            files.extend(f for f in list_audio_files([spec]) if f not in files)
        except DataError as e:
            failed += 1
            print(f"moshax: error: {e}", file=sys.stderr)
    it = files
    if len(files) > 1:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="diarize", unit="file", file=sys.stderr)
    results = []
    for path in it:
        try:
            d = diarize_file(path, cfg, vad, encoder)
        except DataError as e:
            failed += 1
            msg = f"moshax: error: {e}"
            (it.write(msg, file=sys.stderr) if it is not files else print(msg, file=sys.stderr))
            continue
        results.append((Path(path).stem, d.turns))
    if args.output:
        write_rttm(args.output, "", [])  # the file exists (empty) even when every input failed
        for file_id, turns in results:
            write_rttm(args.output, file_id, turns, append=True)
        print(f"wrote {sum(len(t) for _, t in results)} turns of {len(results)} files to {args.output}"
              + (f" ({failed} failed)" if failed else ""), file=sys.stderr)
    else:
        sys.stdout.write("".join(format_rttm(file_id, turns) for file_id, turns in results))
    return 1 if failed else 0
