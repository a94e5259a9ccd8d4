"""The shared payment contract (services/common/payment.py) and typed settings (config.load_into):
pure, no broker or database."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from services.common import config
from services.common.payment import FINAL_STATES, OPEN_STATES, PaymentState, mask_phone

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


@pytest.mark.parametrize("phone, masked", [
    ("254708374149", "*********149"),
    ("254110000001", "*********001"),
    ("12345678", "********"),  # too short to keep anything
])
def test_a_phone_is_masked_down_to_its_last_three_digits(phone, masked):
    assert mask_phone(phone) == masked


def test_the_masked_form_keeps_no_more_than_three_subscriber_digits():
    assert sum(c.isdigit() for c in mask_phone("254708374149")) == 3


def test_the_states_are_the_ones_the_database_allows():
    first = (MIGRATIONS / "0001_payments.sql").read_text()
    check = re.search(r"CHECK \(state IN \(([^)]*)\)\)", first)
    assert check is not None
    assert {s.strip().strip("'") for s in check.group(1).split(",")} == {s.value for s in PaymentState}


def test_a_state_is_open_final_or_in_review_and_never_two_of_these():
    assert not OPEN_STATES & FINAL_STATES
    assert OPEN_STATES | FINAL_STATES | {PaymentState.REVIEW} == set(PaymentState)
    from_the_database: str = "Settled"
    assert PaymentState.SETTLED == from_the_database


SETTINGS = [config.Setting("WORKER_PORT", config.port, 9100), config.Setting("WORKER_NAME", str)]


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    worker_port: int
    worker_name: str


def test_settings_load_into_their_typed_class():
    loaded = config.load_into(WorkerSettings, SETTINGS, {"WORKER_NAME": "w1"})
    assert loaded == WorkerSettings(worker_port=9100, worker_name="w1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.worker_port = 1  # type: ignore[misc]


def test_a_settings_class_that_drifted_from_its_list_is_refused_at_start():
    @dataclasses.dataclass(frozen=True)
    class Drifted:
        worker_port: int
        worker_colour: str

    with pytest.raises(TypeError, match=r"worker_colour.*worker_name"):
        config.load_into(Drifted, SETTINGS, {"WORKER_NAME": "w1"})


def test_a_bad_value_still_names_its_variable():
    with pytest.raises(config.ConfigError, match="WORKER_PORT"):
        config.load_into(WorkerSettings, SETTINGS, {"WORKER_NAME": "w1", "WORKER_PORT": "99999"})
