"""Distributed execution: the operator-to-worker contract, process groups, the gRPC control plane and the
workers. Importing the package imports nothing heavy: `contract` is read by the operator, which has no torch."""
