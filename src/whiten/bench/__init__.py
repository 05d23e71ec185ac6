"""Benchmark harness for whiten optimizers: data sets, models and training protocol."""
