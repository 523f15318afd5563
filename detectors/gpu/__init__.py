"""Detectors on GPU samples: online river models, the mining signature, drift, unowned GPU work."""
