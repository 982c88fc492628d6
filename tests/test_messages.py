"""Message ids: unique within a process and across forked processes."""

from __future__ import annotations

import os

from arbor.messages import Envelope, new_message_id


def test_message_ids_are_unique_in_a_process() -> None:
    ids = [new_message_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert len({Envelope("h").message_id for _ in range(100)}) == 100


def test_forked_child_draws_its_own_prefix() -> None:
    parent_id = new_message_id()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write one id and leave at once
        os.write(writer, new_message_id().encode())
        os._exit(0)
    os.close(writer)
    child_id = os.read(reader, 200).decode()
    os.close(reader)
    os.waitpid(pid, 0)
    next_parent_id = new_message_id()
    assert child_id not in (parent_id, next_parent_id)
    assert child_id.split("-")[0] != parent_id.split("-")[0]
