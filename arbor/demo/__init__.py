"""The arbor demo workload: a distributed static analysis of a Python source tree."""
