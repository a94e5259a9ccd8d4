"""What the worker needs to know of a channel, read through the credential vault's cache."""
from __future__ import annotations

from dataclasses import dataclass

from services.channels.credentials import ChannelCredentials, CredentialStore, CredentialsUnavailable
from services.daraja.models import AppCredentials, Shortcode


@dataclass(frozen=True)
class ChannelAccess:
    channel_id: str
    active: bool
    shortcode: Shortcode
    app: AppCredentials  # masks its secrets in repr
    version: int
    max_amount: int | None = None
    pushes_per_second: float | None = None


class VaultChannels:
    def __init__(self, store: CredentialStore):
        self.store = store

    async def current(self, channel_id: str) -> ChannelAccess | None:
        try:
            return _access(await self.store.get(channel_id))
        except CredentialsUnavailable:
            return None

    async def at_version(self, channel_id: str, version: int) -> ChannelAccess | None:
        try:
            return _access(await self.store.get_version(channel_id, version))
        except CredentialsUnavailable:
            return None


def _access(c: ChannelCredentials) -> ChannelAccess:
    ch = c.channel
    return ChannelAccess(ch.channel_id, c.can_push, ch.shortcode, c.app, c.version, ch.max_amount,
                         ch.pushes_per_second)
