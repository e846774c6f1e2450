"""The whole system on one machine: a real control plane and a node agent whose pods are processes."""
