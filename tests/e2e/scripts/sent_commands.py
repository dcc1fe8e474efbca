"""Which commands a vGPU program sends (a test probe around the client's frame sender)."""

import contextlib
from collections.abc import Iterator

import msgpack

from orion_vgpu.protocol import frames


@contextlib.contextmanager
def sent_commands() -> Iterator[list[list[int]]]:
    """Yields a list that gets, for each frame sent meanwhile, the kinds of its commands."""
    sent: list[list[int]] = []
    original = frames.send_frame

    def counting_send(sock, body, payload=()):  # noqa: ANN001, ANN202
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(bytes(body))
        sent.append([cmd[0] for cmd in unpacker])
        return original(sock, body, payload)

    frames.send_frame = counting_send
    try:
        yield sent
    finally:
        frames.send_frame = original
