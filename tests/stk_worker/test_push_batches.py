"""The push consumer's batches never put more pushes in flight than STK_MAX_IN_FLIGHT allows."""
import dataclasses

import pytest

from services.common import config
from services.stk_worker.bootstrap import PUSH_BATCH, SETTINGS, WorkerSettings

BASE = config.load_into(WorkerSettings, SETTINGS, {"WEBHOOK_TOKEN_SECRETS": "s" * 32})


@pytest.mark.parametrize(("limit", "expected"), [(400, (40, 10)), (100, (40, 2)), (40, (40, 1)), (30, (30, 1)),
                                                 (1, (1, 1))])
def test_batches_times_slots_stay_within_the_limit(limit, expected):
    batch, slots = dataclasses.replace(BASE, stk_max_in_flight=limit).push_batches()
    assert (batch, slots) == expected
    assert batch * slots <= limit


def test_the_default_is_batches_of_forty():
    assert PUSH_BATCH == 40 and BASE.push_batches() == (40, 10)
