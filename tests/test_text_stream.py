"""Word times -> the 12.5 Hz text stream, placed as the reference interleaver places them."""

import json

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.text_stream import (
    EPAD_ID, PAD_ID, Word, check_words_in_audio, encoder_for, parse_words, read_words, text_stream, word_onset_frames,
    write_words)

P, E = PAD_ID, EPAD_ID
IDS = {"hello": [101, 102, 103], "world": [201, 202], "long": [301, 302, 303, 304], "hi": [401, 402]}


def enc(word):
    return IDS[word]


def test_words_land_on_their_frames_with_epad_before():
    words = [Word("hello", 0.0, 0.3), Word("world", 0.4, 0.6)]  # onsets: frame 0, frame 5 (0.4 * 12.5)
    got = text_stream(words, 1.0, enc)
    np.testing.assert_array_equal(got, [101, 102, 103, P, E, 201, 202, P, P, P, P, P, P])
    assert got.dtype == np.int32 and len(got) == 13  # ceil(1.0 * 12.5)
    assert word_onset_frames(words) == [0, 5]


def test_a_word_starting_mid_frame_takes_that_frame():
    # start 0.45 s = frame 5.625: the first frame t with start * 12.5 < t + 1 is t = 5
    got = text_stream([Word("hi", 0.45, 0.6)], 0.8, enc)
    np.testing.assert_array_equal(got, [P, P, P, P, E, 401, 402, P, P, P])


def test_an_overlapping_word_replaces_the_unwritten_tokens_or_queues_them():
    words = [Word("long", 0.0, 0.5), Word("hi", 0.1, 0.3)]  # "hi" starts in frame 1
    np.testing.assert_array_equal(text_stream(words, 0.64, enc), [301, 401, 402, P, P, P, P, P])
    np.testing.assert_array_equal(text_stream(words, 0.64, enc, keep_and_shift=True),
                                  [301, 302, 303, 304, 401, 402, P, P])


def test_speakers_durations_delay_and_no_words():
    words = [Word("hello", 0.0, 0.2, "A"), Word("world", 0.4, 0.6, "B"), Word("hi", 0.5, 0.5, "A")]
    np.testing.assert_array_equal(text_stream(words, 0.64, enc, main_speaker="A"), [101, 102, 103, P, P, P, P, P])
    # positive delay: the text comes earlier than its audio (0.4 s = 5 frames)
    np.testing.assert_array_equal(text_stream([Word("world", 0.8, 1.0)], 0.64, enc, audio_delay=0.4),
                                  [P, P, P, P, E, 201, 202, P])
    np.testing.assert_array_equal(text_stream(None, 0.24, enc), [P, P, P])
    np.testing.assert_array_equal(text_stream(None, 0.24, enc, no_words="mask"), [-1, -1, -1])
    np.testing.assert_array_equal(text_stream([], 0.16, enc), [P, P])


def test_with_a_sentencepiece_model(tmp_path):
    """A real tokenizer: each word's pieces, in order, from its onset frame; decoding the
    non-padding tokens gives the transcript back."""
    from data_pipeline.corpus import write_corpus
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

    paths = write_corpus(tmp_path / "c", train_docs=300, eval_docs=10, seed=0)
    tok = load_tokenizer(train_tokenizer([str(paths["train"])], str(tmp_path / "spm"), 200))
    text = "the cat sat on the mat"
    words = [Word(w, 0.5 * i, 0.5 * i + 0.3) for i, w in enumerate(text.split())]
    stream = text_stream(words, 3.2, encoder_for(tok))
    for w, t in zip(words, word_onset_frames(words)):
        ids = tok.encode(w.text)
        np.testing.assert_array_equal(stream[t: t + len(ids)], ids)
        assert t == 0 or stream[t - 1] == E
    assert tok.decode([int(i) for i in stream if i not in (P, E)]) == text


def test_sidecars_both_layouts_and_bad_ones(tmp_path):
    moshi = {"alignments": [["Hello", [0.1, 0.4], "SPEAKER_MAIN"], ["there", [0.5, 0.8], "SPEAKER_1"]]}
    whisper = {"segments": [{"words": [{"word": " Hello", "start": 0.1, "end": 0.4},
                                       {"text": "there", "start": 0.5, "end": 0.8}]}]}
    a, b = parse_words(moshi), parse_words(whisper)
    assert [(w.text, w.start, w.end) for w in a] == [("Hello", 0.1, 0.4), ("there", 0.5, 0.8)]
    assert [w.speaker for w in a] == ["SPEAKER_MAIN", "SPEAKER_1"] and [w.text.strip() for w in b] == ["Hello", "there"]
    back = read_words(write_words(tmp_path / "w.json", a))
    assert back == a
    bad = {
        "notjson.json": "{not json",
        "nokeys.json": json.dumps({"text": "hello"}),
        "badword.json": json.dumps({"alignments": [["hi", 0.1]]}),
        "nantime.json": json.dumps({"segments": [{"words": [{"word": "hi", "start": "x", "end": 1}]}]}),
        "nowords.json": json.dumps({"segments": [{"text": "hi"}]}),
    }
    for name, content in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError) as e:
            read_words(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="outside the 1.00 s of audio"):
        check_words_in_audio([Word("late", 4.0, 4.5)], 1.0, "x.json")
    check_words_in_audio(a, 1.0, "x.json")
