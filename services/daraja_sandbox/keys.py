"""Typed keys of the objects the sandbox's aiohttp application shares between its handlers."""
from __future__ import annotations

from aiohttp import web

from services.daraja_sandbox.callbacks import CallbackSender
from services.daraja_sandbox.state import Sandbox

SANDBOX = web.AppKey("sandbox", Sandbox)
SENDER = web.AppKey("callback_sender", CallbackSender)
