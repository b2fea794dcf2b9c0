"""Moshi training examples as token shards (kind ``"multistream"``).

One record is an int32 array ``[num_streams, steps]`` (Moshi: ``num_streams = n_q + 1 = 17``) at
the codec frame rate (12.5 Hz): row 0 the text stream (the "inner monologue": text tokens, PAD,
EPAD), rows ``1 .. dep_q`` Moshi's audio codebooks (semantic first), the remaining rows the user's
audio codebooks. Every record of a shard directory has the same shape. ``-1`` is the zero token
(no input, no loss; e.g. the user stream of single-stream pretraining data, or padding past the end
of a recording).

The manifest (see :mod:`data_pipeline.token_shards`) gets a ``"multistream"`` entry::

    {"num_streams": 17, "steps": 125, "text_card": 32000, "card": 2048, "dep_q": 8,
     "frame_rate": 12.5, "text_padding_id": 3, "text_end_padding_id": 0,
     "layout": "text, moshi audio (dep_q codebooks, semantic first), user audio"}

:class:`MultistreamWriter` validates every example (shape, integer dtype, value ranges) before
writing it. :func:`synthetic_examples` makes *structured* fake data for tests and demos, where the
audio codes are a deterministic function of the text stream (so a model has something to learn);
the data-pipeline jobs that turn audio + transcripts into these records use the same writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.token_shards import ShardWriter, read_manifest

KIND = "multistream"
ZERO_TOKEN = -1
LAYOUT = "text, moshi audio (dep_q codebooks, semantic first), user audio"


def validate_example(codes: Any, *, num_streams: int, steps: int, text_card: int, card: int,
                     where: str = "example") -> np.ndarray:
    """Check one example and return it as a contiguous int32 array ``[num_streams, steps]``.

    Text ids must lie in ``[-1, text_card)``, audio ids in ``[-1, card)``; raises
    :class:`DataError` (one line) otherwise."""
    a = np.asarray(codes)
    if a.dtype.kind not in "iu":
        raise DataError(f"{where}: expected integer codes, got dtype {a.dtype}")
    if a.shape != (num_streams, steps):
        raise DataError(f"{where}: shape {tuple(a.shape)}, expected ({num_streams}, {steps}) = (streams, steps)")
    text, audio = a[0], a[1:]
    if text.size and (text.min() < ZERO_TOKEN or text.max() >= text_card):
        raise DataError(f"{where}: text ids span [{text.min()}, {text.max()}], expected [-1, {text_card})")
    if audio.size and (audio.min() < ZERO_TOKEN or audio.max() >= card):
        raise DataError(f"{where}: audio codes span [{audio.min()}, {audio.max()}], expected [-1, {card})")
    return np.ascontiguousarray(a, dtype=np.int32)


class MultistreamWriter:
    """Validating writer of multi-stream examples into ArrayRecord shards + manifest.

    ``with MultistreamWriter(out, steps=125, text_card=32000) as w: w.write(codes)``."""

    def __init__(self, out_dir: str | Path, *, steps: int, text_card: int, card: int = 2048, num_streams: int = 17,
                 dep_q: int = 8, frame_rate: float = 12.5, text_padding_id: int = 3, text_end_padding_id: int = 0,
                 records_per_shard: int = 1024, metadata: dict | None = None):
        if steps <= 0 or num_streams < 2 or not 0 < dep_q < num_streams:
            raise DataError(f"multistream writer: bad layout steps={steps} num_streams={num_streams} dep_q={dep_q}")
        self.spec = {"num_streams": int(num_streams), "steps": int(steps), "text_card": int(text_card),
                     "card": int(card), "dep_q": int(dep_q), "frame_rate": float(frame_rate),
                     "text_padding_id": int(text_padding_id), "text_end_padding_id": int(text_end_padding_id),
                     "layout": LAYOUT}
        meta = dict(metadata or {})
        meta["multistream"] = self.spec
        self._writer = ShardWriter(out_dir, records_per_shard=records_per_shard, kind=KIND, metadata=meta)
        self.count = 0
        self.frames = 0

    def write(self, codes: Any, *, item: str | None = None) -> None:
        a = validate_example(codes, num_streams=self.spec["num_streams"], steps=self.spec["steps"],
                             text_card=self.spec["text_card"], card=self.spec["card"],
                             where=item or f"example {self.count}")
        self._writer.write(a)
        self.count += 1
        self.frames += a.shape[1]

    def record_failure(self, item: str, error: str) -> None:
        self._writer.record_failure(item, error)

    def close(self, stats: dict | None = None) -> dict:
        hours = self.frames / self.spec["frame_rate"] / 3600.0
        return self._writer.close({"examples": self.count, "frames": self.frames, "hours": hours, **(stats or {})})

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._writer.__exit__(exc_type, exc, tb)


def read_multistream_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a multi-stream shard directory (a :class:`DataError` for any other kind)."""
    manifest = read_manifest(shard_dir)
    if manifest.get("kind") != KIND:
        raise DataError(f"token shards at {shard_dir} are of kind {manifest.get('kind')!r}, expected {KIND!r} "
                        "(multi-stream Moshi examples)")
    if manifest.get("total_records", 0) == 0 or not manifest.get("record"):
        raise DataError(f"token shards at {shard_dir} hold no records")
    return manifest


# ---------------------------------------------------------------------------------------------
# Structured synthetic data
# ---------------------------------------------------------------------------------------------


def _markov_tokens(rng: np.random.Generator, n: int, text_card: int, first: int = 4) -> np.ndarray:
    """A learnable token sequence over [first, text_card): a sparse random first-order chain."""
    vocab = np.arange(first, text_card)
    nxt = rng.choice(vocab, size=(text_card, 3))  # each token has 3 likely successors
    out = np.empty(n, np.int64)
    tok = int(rng.choice(vocab))
    for i in range(n):
        out[i] = tok
        tok = int(nxt[tok, rng.integers(0, 3)]) if rng.random() < 0.9 else int(rng.choice(vocab))
    return out


def _audio_for(text: np.ndarray, *, card: int, dep_q: int, salt: int, pad_ids: tuple[int, ...]) -> np.ndarray:
    """Deterministic fake codec codes [dep_q, T] for a text stream [T]: the semantic code is a hash
    of the word being spoken (the latest non-pad token) and the frames since it started; during
    silence it cycles through 4 "silence" codes; acoustic codebook k is a hash of the semantic code,
    the previous frame's semantic code and k."""
    t_len = text.shape[0]
    sem = np.empty(t_len, np.int64)
    word, age = -1, 0
    for t in range(t_len):
        tok = int(text[t])
        if tok >= 0 and tok not in pad_ids:
            word, age = tok, 0
        else:
            age += 1
        if word < 0 or age >= 4:  # silence
            sem[t] = (t % 4) + salt % 7
        else:
            sem[t] = (word * 7919 + age * 104729 + salt * 31) % (card - 16) + 16
    prev = np.concatenate([[sem[0]], sem[:-1]])
    out = [sem]
    for k in range(1, dep_q):
        out.append((sem * (2 * k + 1) + prev * 13 + k * 977 + salt) % card)
    return np.stack(out).astype(np.int64)


def text_stream(tokens: np.ndarray, steps: int, rng: np.random.Generator, *, pad_id: int = 3,
                epad_id: int = 0) -> tuple[np.ndarray, int]:
    """Lay ``tokens`` out on a frame grid like aligned speech: words of 1-3 tokens separated by 1-4
    PAD frames, EPAD on the frame before each word. Returns (text [steps], tokens used)."""
    text = np.full(steps, pad_id, np.int64)
    t, i = int(rng.integers(0, 3)), 0
    while t < steps and i < len(tokens):
        n = int(rng.integers(1, 4))
        if t > 0 and text[t - 1] == pad_id:
            text[t - 1] = epad_id
        for tok in tokens[i: i + n]:
            if t >= steps:
                break
            text[t] = tok
            t += 1
        i += n
        t += int(rng.integers(1, 5))
    return text, i


def synthetic_examples(n: int, *, steps: int, text_card: int, card: int = 2048, n_q: int = 16, dep_q: int = 8,
                       seed: int = 0, tokens: np.ndarray | None = None, two_streams: bool = True,
                       pad_id: int = 3, epad_id: int = 0) -> Iterator[np.ndarray]:
    """``n`` structured examples ``[n_q + 1, steps]`` (int32). Text: ``tokens`` (e.g. a tokenized
    corpus, consumed in order) or a random Markov chain, laid out by :func:`text_stream`. Moshi's
    audio is a deterministic function of the text (:func:`_audio_for`). The user stream is a second
    synthetic speaker (``two_streams``) or all -1 (single-stream pretraining data)."""
    rng = np.random.default_rng(seed)
    if tokens is None:
        tokens = _markov_tokens(rng, max(n * steps, 1), text_card)
    tokens = np.asarray(tokens, np.int64)
    tokens = tokens[(tokens >= 0) & (tokens < text_card) & (tokens != pad_id) & (tokens != epad_id)]
    if tokens.size == 0:
        raise DataError("synthetic_examples: no usable text tokens")
    pos = 0
    n_user = n_q - dep_q
    for _ in range(n):
        text, used = text_stream(np.roll(tokens, -pos)[: steps], steps, rng, pad_id=pad_id, epad_id=epad_id)
        pos = (pos + max(used, 1)) % tokens.size
        moshi = _audio_for(text, card=card, dep_q=dep_q, salt=0, pad_ids=(pad_id, epad_id))
        if n_user <= 0:
            user = np.zeros((0, steps), np.int64)
        elif two_streams:
            other, _ = text_stream(rng.choice(tokens, size=steps), steps, rng, pad_id=pad_id, epad_id=epad_id)
            user = _audio_for(other, card=card, dep_q=n_user, salt=1, pad_ids=(pad_id, epad_id))
        else:
            user = np.full((n_user, steps), ZERO_TOKEN, np.int64)
        yield np.concatenate([text[None], moshi[:dep_q], user]).astype(np.int32)


def write_examples(out_dir: str | Path, examples: Iterable[np.ndarray], *, steps: int, text_card: int,
                   card: int = 2048, num_streams: int = 17, dep_q: int = 8, records_per_shard: int = 1024,
                   metadata: dict | None = None) -> dict:
    """Write ``examples`` with a :class:`MultistreamWriter`; returns the manifest."""
    with MultistreamWriter(out_dir, steps=steps, text_card=text_card, card=card, num_streams=num_streams,
                           dep_q=dep_q, records_per_shard=records_per_shard, metadata=metadata) as w:
        for ex in examples:
            w.write(ex)
    return w.close()


def _corpus_tokens(text_file: str, tokenizer: str, limit: int) -> np.ndarray:
    from data_pipeline.tokenizer import load_tokenizer

    sp = load_tokenizer(tokenizer)
    out: list[int] = []
    with open(text_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.extend(sp.encode(line.strip()))
            if len(out) >= limit:
                break
    return np.asarray(out, np.int64)


def add_synth_arguments(p) -> None:
    """Flags of ``moshax data synth-multistream`` (an argparse parser)."""
    p.add_argument("--output", required=True)
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--frames", "--steps", dest="frames", type=int, default=125,
                   help="12.5 Hz frames per example (the config's data.frames)")
    p.add_argument("--text-card", type=int, default=512)
    p.add_argument("--card", type=int, default=2048)
    p.add_argument("--n-q", type=int, default=16)
    p.add_argument("--dep-q", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-stream", action="store_true", help="user streams all -1 (pretraining data)")
    p.add_argument("--text-from", help="a .txt corpus for the text stream (with --tokenizer)")
    p.add_argument("--tokenizer", help="sentencepiece .model for --text-from")


def synth_command(args) -> int:
    """``moshax data synth-multistream --output DIR ...``: structured synthetic shards."""
    tokens = None
    if args.text_from:
        if not args.tokenizer:
            raise DataError("--text-from needs --tokenizer")
        tokens = _corpus_tokens(args.text_from, args.tokenizer, args.examples * args.frames)
    ex = synthetic_examples(args.examples, steps=args.frames, text_card=args.text_card, card=args.card,
                            n_q=args.n_q, dep_q=args.dep_q, seed=args.seed, tokens=tokens,
                            two_streams=not args.single_stream)
    m = write_examples(args.output, ex, steps=args.frames, text_card=args.text_card, card=args.card,
                       num_streams=args.n_q + 1, dep_q=args.dep_q,
                       metadata={"synthetic": {"seed": args.seed, "text_from": args.text_from}})
    print(f"wrote {m['total_records']} examples [{args.n_q + 1}, {args.frames}] "
          f"({m['stats']['hours']:.2f} h at 12.5 Hz) in {len(m['shards'])} shard(s) to {args.output}")
    return 0
