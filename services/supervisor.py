"""`mpesa-pipeline run`: every service in the foreground with prefixed logs; Ctrl-C stops them all."""
from __future__ import annotations

import asyncio
import os
import signal
import sys

COLOURS = ["36", "32", "35", "33", "34", "31"]


def _output(proc: asyncio.subprocess.Process) -> asyncio.StreamReader:
    assert proc.stdout is not None, "started with stdout=PIPE"
    return proc.stdout


async def _pipe(name: str, colour: str, stream: asyncio.StreamReader, width: int = 16) -> None:
    prefix = f"\x1b[{colour}m{name:<{width}}|\x1b[0m " if sys.stdout.isatty() else f"{name:<{width}}| "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def supervise(services: list[tuple[str, list[str]]], env: dict[str, str] | None = None,
                    own_env: dict[str, dict[str, str]] | None = None) -> int:
    """Starts (name, argv) processes, each with `env` plus its own `own_env[name]` (its Kafka login, its database role);
    when one exits or a signal comes, stops the rest."""
    procs = []
    for name, argv in services:
        proc_env = {**os.environ, **(env or {}), **(own_env or {}).get(name, {}), "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(*argv, env=proc_env,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        procs.append((name, proc))
    width = max([16, *(len(n) for n, _ in procs)])  # "webhook-gateway-2" and the like stay aligned
    pipes = [asyncio.create_task(_pipe(n, COLOURS[i % len(COLOURS)], _output(p), width))
             for i, (n, p) in enumerate(procs)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(p.wait()) for _, p in procs]
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
    exited = [(n, p.returncode) for n, p in procs if p.returncode is not None]
    for _, proc in procs:
        if proc.returncode is None:
            proc.terminate()
    try:
        await asyncio.wait_for(asyncio.gather(*waits), timeout=20)
    except TimeoutError:
        for _, proc in procs:
            if proc.returncode is None:
                proc.kill()
        await asyncio.gather(*waits)
    await asyncio.gather(*pipes)
    stopper.cancel()
    if exited and not stop.is_set():
        print(f"stopped everything because {exited[0][0]} exited with {exited[0][1]}", file=sys.stderr)
        return 1
    return 0
