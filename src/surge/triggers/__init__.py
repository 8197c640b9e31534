"""Triggers: timers (``every``, ``cron``) and conditions over event streams.

Two parts that share only how a trigger becomes a subscription
(``_subscription``): ``_timers`` fires :class:`Tick` events on a schedule,
``_conditions`` watches event streams and publishes :class:`ConditionMet`.
Both run inside an app as parts (``App.attach``), through the runtime the
app hands them. The public names are re-exported by ``surge``.
"""

from ._conditions import Condition, ConditionMet, absence, count, sequence, when
from ._timers import Misfire, Tick, cron, every

__all__ = (
    "Condition",
    "ConditionMet",
    "Misfire",
    "Tick",
    "absence",
    "count",
    "cron",
    "every",
    "sequence",
    "when",
)
