"""Fault injection: real processes killed, starved, stormed and fed bad input (issue 6).

The fault loops live in modules of their own (`kill`, `overflow`, `master_death`, `storms`,
`pid_reuse`, `bad_input`, `soak`, `ring_model`) so that the tests and the figures script
(`benchmarks/reliability_figures.py`) run the very same code: each loop runs as the master in a
fresh interpreter (`faults.run_fault`) and returns a `Tally`.
"""
