"""What the rest of the machine did during a benchmark.

This development machine is a 2-vCPU KVM guest: its hypervisor takes CPU time away ("steal",
/proc/stat) and other tasks queue for the two CPUs (pressure, /proc/pressure/cpu). The same code's
figures swing with both, so every benchmark prints them beside its own. Hosts also differ in speed:
`host_speed_s()` is a fixed yardstick to print beside figures that are compared across hosts.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

HOST_SPEED_STEPS = 10_000_000


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot; None where /proc/stat is not Linux's."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


def cpu_seconds(pid: int, *, main_thread_only: bool = False) -> float:
    """User + system CPU time of a process and its threads (librdkafka's included), or of its
    main thread alone: the one that runs all the Python, so the one that caps the throughput."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process's live threads: how often it slept and
    was woken, and how often it was preempted. On this virtual machine a sleep and its wake-up cost
    50–100 µs of the sleeper's CPU (docs/cpu-per-payment.md, "Fourth round"), so these explain CPU
    figures that the work done does not. Threads that ended are not counted."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def cpu_pressure() -> str:
    """Share of the last 10 s some runnable task waited for a CPU (Linux PSI): high means a busy machine."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0].split()[1]
    except (OSError, IndexError):
        return "unknown"


class HostLoad:
    """Steal since creation, and the pressure now: `figures()` at the end of a phase."""

    def __init__(self) -> None:
        self._start = _cpu_ticks()

    def steal_percent(self) -> float | None:
        end = _cpu_ticks()
        if self._start is None or end is None or end[1] == self._start[1]:
            return None
        return round(100 * (end[0] - self._start[0]) / (end[1] - self._start[1]), 1)

    def figures(self) -> dict:
        return {"host_steal_percent": self.steal_percent(), "host_cpu_pressure": cpu_pressure()}

    def describe(self) -> str:
        steal = self.steal_percent()
        return f"host: {'unknown' if steal is None else f'{steal}%'} CPU stolen by the hypervisor, " \
               f"pressure {cpu_pressure()}"


def host_speed_s(steps: int = HOST_SPEED_STEPS, repeats: int = 3) -> float:
    """Seconds a plain Python loop of `steps` additions takes on one core, the best of `repeats` (other
    work only ever slows a try down). Run it before the load. The loop runs in a function (local
    variables); the same loop at a module's top level takes about three times as long, so compare this
    figure only with itself."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for step in range(steps):
            total += step
        best = min(best, time.perf_counter() - started)
    return round(best, 3)
