"""Benchmarks of mae-serve: the bare-model ceiling, the server end to end, a plain baseline, cold start."""
