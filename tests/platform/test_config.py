"""Bad configuration stops a service with one clear line naming the variable."""
import subprocess
import sys

import pytest

from services.common import config
from tests.conftest import ROOT


@pytest.mark.parametrize("module, env, expected", [
    ("services.ingress", {"INGRESS_PORT": "eighty"}, "INGRESS_PORT='eighty' is invalid: must be a whole number"),
    ("services.ingress", {"KAFKA_BOOTSTRAP_SERVERS": "no-port-here"},
     "KAFKA_BOOTSTRAP_SERVERS='no-port-here' is invalid: must be host:port"),
    ("services.ledger", {"DATABASE_URL": "mysql://x"},
     "DATABASE_URL='mysql://x' is invalid: must be a postgresql:// URL"),
    ("services.ledger", {"LOG_LEVEL": "loud"},
     "LOG_LEVEL='loud' is invalid: must be one of DEBUG, INFO, WARNING, ERROR"),
])
def test_bad_config_gives_one_clear_line(module, env, expected):
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_a_missing_required_setting_is_named():
    with pytest.raises(config.ConfigError, match="^WEBHOOK_TOKEN_SECRET is required but not set"):
        config.load([config.Setting("WEBHOOK_TOKEN_SECRET", secret=True)], {})


def test_secrets_never_show_in_errors_or_descriptions():
    secret = config.Setting("ADMIN_TOKEN", config.positive_int, secret=True)
    with pytest.raises(config.ConfigError) as err:
        config.load([secret], {"ADMIN_TOKEN": "hunter2"})
    assert "hunter2" not in str(err.value)
    db = config.Setting("DATABASE_URL", config.postgres_url)
    values = config.load([secret, db], {"ADMIN_TOKEN": "12345", "DATABASE_URL": "postgresql://u:pa55@h/db"})
    shown = config.describe([secret, db], values)
    assert "12345" not in shown and "pa55" not in shown and "postgresql://u:****@h/db" in shown


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "0", "-1", "ten"])
def test_a_duration_must_be_a_finite_positive_number(raw):
    with pytest.raises(ValueError):
        config.positive_float(raw)


@pytest.mark.parametrize("raw", ["1_000", " 7", "7 ", "٥", "7\n", "+7", ""])
def test_a_whole_number_is_plain_ascii_digits(raw):
    with pytest.raises(ValueError):
        config.whole_number(raw)


def test_plain_numbers_still_read():
    assert (config.whole_number("8080"), config.whole_number("-3"), config.positive_float("0.5")) == (8080, -3, 0.5)


@pytest.mark.parametrize("raw", ["-1", "1001", "0.5", ""])
def test_a_linger_is_a_bounded_whole_number_of_milliseconds(raw):
    # -1 would reach librdkafka's consume as "wait for ever" for a batch that never fills
    with pytest.raises(ValueError):
        config.linger_ms(raw)


def test_a_linger_may_be_zero_or_up_to_a_second():
    assert (config.linger_ms("0"), config.linger_ms("100"), config.linger_ms("1000")) == (0, 100, 1_000)
