"""Detectors on network and DNS events: pool intelligence and mining protocols in flow payloads."""
