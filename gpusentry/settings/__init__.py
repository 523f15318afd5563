"""Configuration sections, one module each, so each part of the system owns its own options.

The root model lives in :mod:`gpusentry.config`; this package only holds the section models.
"""
