"""Run as a subprocess: consumes one event, records it, and dies with SIGKILL before committing."""
import asyncio
import os
import signal
import sys

from services.common.avro import open_codec
from services.common.kafka import ConsumerLoop, EventProducer
from services.common.topics import DEAD_LETTER, Topic


async def main(bootstrap: str, group: str, topic: str, record_path: str) -> None:
    codec = await open_codec(os.environ.get("SCHEMA_REGISTRY_URL", ""), [DEAD_LETTER])

    async def handler(events):
        with open(record_path, "a") as out:
            for e in events:
                out.write(e.value["event_id"] + "\n")
        os.kill(os.getpid(), signal.SIGKILL)  # the handler finished; the commit never happens

    loop = ConsumerLoop(bootstrap=bootstrap, group_id=group, topics=[Topic(topic, "payment_requested")],
                        codec=codec, handler=handler, dead_letters=EventProducer(bootstrap, codec, client_id="dies"))
    await loop.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
