"""Neural network, physics (mass-conserving projection), losses and metrics.

Nothing in this package reads files, knows about CRSs or prints: it works on
tensors and arrays only, so it can be tested and reused without the GIS stack.
"""
