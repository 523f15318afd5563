"""Analyst feedback: who may suppress incidents, and how `gpusentry feedback add` signs verdicts."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from pydantic import Field, field_validator

from gpusentry.settings.base import Section


class FeedbackSettings(Section):
    trusted_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Analysts' Ed25519 public keys that may sign verdicts: key id -> base64 public key, as "
                    "`gpusentry feedback keygen` prints it. Workers hold only these public keys; the signing "
                    "keys stay with the analysts (never on a GPU node).")
    require_signature: bool = Field(
        True, description="Refuse (dead-letter) every verdict not signed by a trusted key. Turn off only on a "
                          "closed test setup: anyone who can write the feedback topic can then silence incidents.")
    signing_key_file: Path | None = Field(
        None, description="Your Ed25519 signing key (from `gpusentry feedback keygen`), used by `feedback add` "
                          "and `feedback revoke` on an analyst's machine.")
    signing_key_id: str | None = Field(
        None, description="The id your public key has in the workers' `trusted_keys` (default: the key file's "
                          "name without its extension).")
    analyst: str | None = Field(None, description="Who you are in the audit record (default: $USER).")
    default_expiry_days: float = Field(7.0, gt=0, le=366,
                                       description="How long a verdict lasts when `feedback add` is given no "
                                                   "`--expires`.")

    @field_validator("trusted_keys")
    @classmethod
    def _public_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for key_id, value in keys.items():
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"trusted_keys.{key_id} is not a base64 Ed25519 public key (32 bytes); paste the "
                                 f"line `gpusentry feedback keygen` printed")
        return keys
