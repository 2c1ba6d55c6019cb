"""Simulation harness: link profiles, delay-injecting proxy, fleet simulator, benchmarks."""
