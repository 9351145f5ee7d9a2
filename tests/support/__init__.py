"""Test support: real processes, probes, stubs and waiting helpers the tests share."""
