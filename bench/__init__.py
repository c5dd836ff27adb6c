"""Benchmarks for konfuzio-watch: ``python -m bench`` prints a table of figures (not a pass/fail test)."""
