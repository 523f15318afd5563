"""Host-supplied text on a terminal: never markup, never a control sequence."""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(value: Any) -> str:
    """``value`` as a string with control characters written as ``\\xNN``."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def shown(value: Any) -> Text:
    """A host-supplied value for a rich view: plain text (no markup), control characters as ``\\xNN``, so an
    escape sequence in a command line cannot move the cursor or recolour the view."""
    return Text(plain(value))
