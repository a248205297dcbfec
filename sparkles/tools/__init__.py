"""Command-line tools (parity check)."""
