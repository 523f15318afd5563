"""Detectors on process events: miners by name, flags and config, odd paths, masquerading, abused services."""
