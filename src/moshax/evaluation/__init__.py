"""Evaluation: codec metrics (SI-SDR, mel distance, bitrate) on a folder of audio."""

from moshax.evaluation.codec import bitrate, evaluate_codec, format_report

__all__ = ["bitrate", "evaluate_codec", "format_report"]
