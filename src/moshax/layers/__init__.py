"""Shared building blocks: norms, RoPE, attention (+ KV ring cache), MLPs, scanned stacks."""
