"""Evaluation: codec metrics (SI-SDR, mel distance, bitrate) on a folder of audio."""

from moshax.evaluation.codec import CodecRunner, bitrate, evaluate_codec, format_report

__all__ = ["CodecRunner", "bitrate", "evaluate_codec", "format_report"]
