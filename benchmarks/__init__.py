"""Benchmarks: `omniflow bench NAME` runs `benchmarks.NAME.main(argv)` (transport, decode, graph, train)."""
