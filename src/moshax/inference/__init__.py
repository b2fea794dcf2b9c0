"""Inference helpers shared by the codec runner, benchmarks and (later) the streaming decoder."""
