"""Benchmark of the notifier against the old sequential design, or a git ref (`python -m bench`).

Everything runs in separate processes on 127.0.0.1: moto (S3), a count-only SMTP sink,
an optional delay proxy, and each measured target in a fresh interpreter. See README.md.
"""
