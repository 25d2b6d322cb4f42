"""Tensors only: the network, physics (mass-conserving projection), baselines, losses, metrics and
the dasymetric prior; nothing here reads files, knows about CRSs or prints."""
