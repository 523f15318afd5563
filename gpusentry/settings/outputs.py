"""Alert destinations (SIEMs, chat, paging) and their delivery policy."""

from __future__ import annotations

from gpusentry.settings.base import Section


class OutputSettings(Section):
    pass
