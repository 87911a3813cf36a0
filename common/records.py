"""Deprecated alias of :mod:`fedpriv.common.wire`, where every record name and key now lives.

Kept only so older scripts and tests that ``from fedpriv.common import records`` keep working.
"""

from fedpriv.common.wire import *  # noqa: F401,F403
from fedpriv.common.wire import (ARRAYS, CONFIG, DECLINED, METRICS, NUM_EXAMPLES, PRIVACY, RUN_CLASSES,  # noqa: F401
                                 RUN_INPUT_SHAPE, SECAGG_CLIPPED, UNIT_WEIGHT)
