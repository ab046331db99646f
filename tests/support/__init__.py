"""Helpers shared by the tests: peers on loopback, a TensorRT stand-in."""
