"""Pure parts of the notifier's bookkeeping: which secret versions sign, and what a batch of attempts
says about an endpoint's run of failures."""
from __future__ import annotations

from datetime import timedelta

from services.channels.vault import SealedCredentials
from services.notifier.signing import signing_versions
from services.notifier.store import EndpointHealth, SealedSecret
from services.notifier.writer import health_of
from tests.notifier.fakes import T0

SEALED = SealedCredentials("k", b"w", b"n" * 12, b"c")


def version(n: int, expires_in_s: float | None) -> SealedSecret:
    return SealedSecret(n, SEALED, None if expires_in_s is None else T0 + timedelta(seconds=expires_in_s))


def test_the_newest_secret_signs_with_the_older_ones_still_in_their_overlap():
    versions = [version(1, -60), version(2, 3600), version(3, None)]
    assert [v.version for v in signing_versions(versions, T0)] == [3, 2]


def test_an_old_secret_past_its_overlap_or_replaced_without_one_does_not_sign():
    assert [v.version for v in signing_versions([version(1, 0), version(2, None)], T0)] == [2]
    assert [v.version for v in signing_versions([version(1, None), version(2, None)], T0)] == [2]
    assert signing_versions([], T0) == []


def test_an_endpoints_failing_run_starts_at_its_first_failure_after_its_last_success():
    t = [T0 + timedelta(seconds=i) for i in range(5)]
    outcomes = [("a", False, t[0]), ("a", False, t[1]),                     # still failing: since t0
                ("b", False, t[0]), ("b", True, t[1]), ("b", False, t[2]),  # a success ended the run
                ("c", False, t[0]), ("c", True, t[1])]                      # recovered
    assert {h.endpoint_id: h for h in health_of(outcomes)} == {
        "a": EndpointHealth("a", False, t[0], t[1]), "b": EndpointHealth("b", True, t[2], t[2]),
        "c": EndpointHealth("c", True, None)}
