"""The in-process floor of issue 14: what a relay's work on one small item costs
with no process, socket or framework around it.

One loop in the bench process, over the small items of the small-message
scenarios (packed beforehand): for each batch of BATCH packed items,
``msgpack.unpackb`` of each, the identity call, ``msgpack.packb`` of each
output, ``b"".join`` of the batch. The CPU time of that loop (the calling
thread's, `time.thread_time`) per item is the floor a hop of a pipeline is held
against: a hop is one such unpack, call and pack, plus the transport.

For information, the same loop as the batched raw relay does it (bench/raw.py):
the batch unpacked in one ``unpackb`` call (a msgpack array of the items), a
reused ``Packer`` per output, the array header in front of the join.
"""

from __future__ import annotations

import time

import msgpack

from .raw import BATCH, identity


def _items(count: int) -> list[bytes]:
    return [msgpack.packb({"id": i, "payload": "x" * 60, "v": 1.5}) for i in range(count)]


def floor(count: int = 200_000, passes: int = 3) -> dict:
    """CPU µs per item of the floor loop (``floor_us``) and of the batched relay's
    loop (``relay_us``): the fastest of ``passes`` passes over ``count`` items each."""
    packed = _items(count)
    chunks = [packed[start:start + BATCH] for start in range(0, count, BATCH)]
    messages = [msgpack.Packer().pack_array_header(len(chunk)) + b"".join(chunk)
                for chunk in chunks]
    unpackb, packb, join, call = msgpack.unpackb, msgpack.packb, b"".join, identity
    packer = msgpack.Packer()
    pack, header = packer.pack, packer.pack_array_header
    clock = time.thread_time
    floors, relays = [], []
    for _ in range(passes):
        start = clock()
        for chunk in chunks:
            join([packb(call(unpackb(data))) for data in chunk])
        floors.append(clock() - start)
        start = clock()
        for message in messages:
            outputs = [pack(call(item)) for item in unpackb(message)]
            header(len(outputs)) + join(outputs)
        relays.append(clock() - start)
    return {"floor_us": min(floors) / count * 1e6, "relay_us": min(relays) / count * 1e6,
            "count": count, "passes": passes}
