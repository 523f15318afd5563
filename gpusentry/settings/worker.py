"""Options of the stream worker (`gpusentry worker`)."""

from __future__ import annotations

from pydantic import Field

from gpusentry.settings.base import Section


class WorkerSettings(Section):
    app_id: str = Field("gpusentry", description="faust application id: the consumer group and the "
                        "prefix of its changelog topics. Workers with the same id share the work.")
