"""Runnable examples of Arbor features; run each with `python -m examples.<name>`."""
