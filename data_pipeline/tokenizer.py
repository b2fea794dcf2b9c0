"""SentencePiece tokenizer: train one on .txt/.jsonl files, load one with clear errors.

The special ids follow Kyutai's text tokenizers: ``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2,
``<pad>`` = 3 — reserved, so no word ever encodes to Moshi's text PAD (3); Moshi's EPAD is 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from data_pipeline.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def _iter_documents(paths: Sequence[Path], jsonl_field: str) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
                    if not isinstance(record, dict) or jsonl_field not in record:
                        raise DataError(f"{path}:{lineno}: no field '{jsonl_field}' in the JSON record")
                    text = str(record[jsonl_field]).strip()
                    if text:
                        yield text
            else:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line


def train_tokenizer(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed: int = 0,
    jsonl_field: str = "text",
    byte_fallback: bool = False,
    pad_id: int = 3,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 16,
    hard_vocab_limit: bool = True,
) -> Path:
    """Train a SentencePiece model on ``inputs`` and return the path of ``{output_prefix}.model``.

    ``inputs`` are ``.txt`` files (one document per line) or ``.jsonl`` files (the document is the
    ``jsonl_field`` of each record). Documents are streamed to the trainer, which samples at most
    ``input_sentence_size`` of them. With ``hard_vocab_limit=False`` a corpus too small for
    ``vocab_size`` gives a smaller vocabulary instead of an error. ``seed`` fixes SentencePiece's
    random generator (sentence sampling); the result also depends on ``num_threads``, which is
    therefore a fixed default rather than the machine's core count. Raises :class:`DataError` for a missing input, a bad
    record or a vocabulary the corpus cannot fill.
    """
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise DataError(f"model_type={model_type!r}: expected one of unigram, bpe, char, word")
    if vocab_size <= 3:
        raise DataError(f"vocab_size={vocab_size}: must be larger than the 3 special pieces")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("train_tokenizer: no input files given")
    for p in paths:
        if not p.is_file():
            raise DataError(f"tokenizer training input not found: {p}")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    spm.SetRandomGeneratorSeed(int(seed) & 0xFFFFFFFF)
    input_errors: list[DataError] = []

    def documents() -> Iterator[str]:
        # An exception raised inside the iterator reaches Python wrapped in a RuntimeError that
        # holds a traceback; keep ours and raise it after the trainer returns.
        try:
            yield from _iter_documents(paths, jsonl_field)
        except DataError as e:
            input_errors.append(e)

    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=documents(),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=pad_id,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=num_threads,
            hard_vocab_limit=hard_vocab_limit,
            minloglevel=2,
        )
    except RuntimeError as e:
        if not input_errors:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DataError(f"sentencepiece training failed for {prefix}.model: {last}") from None
    if input_errors:
        for suffix in (".model", ".vocab"):  # do not leave a model trained on part of the input
            Path(f"{prefix}{suffix}").unlink(missing_ok=True)
        raise input_errors[0]
    return Path(f"{prefix}.model")


KYUTAI_TOKENIZER = "tokenizer_spm_32k_3.model"
HOW_TO_GET = (f"download Kyutai's {KYUTAI_TOKENIZER} from their Hugging Face repos (e.g. kyutai/moshiko-pytorch-bf16) "
              "or train one: moshax tokenizer train --input corpus.txt --vocab-size N --output tok/spm")


def load_tokenizer(path: str | Path | None, key: str | None = None) -> spm.SentencePieceProcessor:
    """Load a SentencePiece ``.model`` file; :class:`DataError` if missing or not a model.

    ``key`` names the setting the path came from (``data.tokenizer``): a missing or empty path
    then says which key to set, and how to get a tokenizer."""
    if path is None or not str(path).strip():
        what = f"{key} is not set" if key else "no tokenizer file given"
        raise DataError(f"{what}: name a sentencepiece .model ({HOW_TO_GET})")
    path = Path(path)
    if not path.is_file():
        hint = f"set {key} to a sentencepiece .model: {HOW_TO_GET}" if key else HOW_TO_GET
        raise DataError(f"tokenizer file not found: {path} ({hint})")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(model_file=str(path))
    except (RuntimeError, OSError, ValueError):
        raise DataError(f"not a sentencepiece model: {path}") from None
    return sp
