"""Real processes on loopback for the tests and the benchmarks: the `tabby` model server and the site.

Nothing here is part of Gantry itself; `tests/` and `bench/` both import it, and it imports neither.
"""
