"""Attention implementations and their dispatch (plain XLA, query-chunked XLA; Pallas later)."""
