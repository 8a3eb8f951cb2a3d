"""Benchmark implementations behind ``hift bench``; each prints a table and writes JSON (see common.py)."""
