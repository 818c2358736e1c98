"""The patches of Flower internals (server/flower_patches.py) hold for the installed Flower.

These tests fail loudly on a Flower upgrade: re-read the Flower code each patch names,
re-measure its effect, update the patch, then bump ``PATCHED_FLOWER``."""

from __future__ import annotations

import logging
import threading
import time


from server import flower_patches
from server.flower_patches import PATCHED_ATTRIBUTES, PATCHED_FLOWER


def test_the_installed_flower_is_the_patched_version():
    import flwr

    assert flwr.__version__ == PATCHED_FLOWER, (
        f"flwr {flwr.__version__} is installed but server/flower_patches.py was made for flwr "
        f"{PATCHED_FLOWER}: its patches are skipped (slower runs). Re-read and re-measure each patch, "
        "then set PATCHED_FLOWER")


def test_every_attribute_a_patch_touches_still_exists_in_flower():
    assert flower_patches.missing_attributes() == [], (
        "Flower no longer has what these patches replace: re-read server/flower_patches.py")


def test_the_attribute_check_would_notice_a_missing_one(monkeypatch):
    monkeypatch.setitem(PATCHED_ATTRIBUTES, "gone", ("flwr.common.constant:NO_SUCH_NAME",
                                                     "flwr.no_such_module:x"))
    assert flower_patches.missing_attributes() == [
        "gone: flwr.common.constant:NO_SUCH_NAME", "gone: flwr.no_such_module:x (no module flwr.no_such_module)"]


def test_the_supernode_still_waits_the_constants_the_patch_replaces():
    """The poll patch replaces the SuperNode's `time.sleep(FLOWER_POLL_S)`; the heartbeat
    patch Flower's default interval."""
    import inspect

    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
    from flwr.supernode import start_client_internal

    assert f"time.sleep({flower_patches.FLOWER_POLL_S:g})" in inspect.getsource(start_client_internal)
    assert HEARTBEAT_DEFAULT_INTERVAL == flower_patches.FLOWER_HEARTBEAT_S


def test_the_engine_poll_patch_replaces_flowers_loop_and_still_delivers(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)  # restored after
    assert flower_patches.quicker_engine_poll(nodes=4)
    assert vce_api.add_messages_to_queue.__module__ == "server.flower_patches"

    class State:
        def get_message_ins(self, node_id, limit):
            return [f"msg-{node_id}"] if node_id == 7 else []

    import queue

    q, stop = queue.Queue(), threading.Event()
    loop = threading.Thread(target=vce_api.add_messages_to_queue, args=(State(), q, {7: 0, 8: 1}, stop))
    loop.start()
    first = q.get(timeout=1)
    stop.set()
    loop.join(timeout=1)
    assert first == "msg-7" and not loop.is_alive()


def test_the_supernode_patch_sets_poll_and_heartbeat(monkeypatch):
    from flwr.supercore import heartbeat as sender
    from flwr.supernode import fleet_http_connection, start_client_internal

    for module, name in [(start_client_internal, "time"), (fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL"),
                         (sender, "HEARTBEAT_DEFAULT_INTERVAL")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after
    assert flower_patches.supernode_timings(poll=0.05, heartbeat=12.0)
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 12.0 == sender.HEARTBEAT_DEFAULT_INTERVAL
    t0 = time.monotonic()
    start_client_internal.time.sleep(flower_patches.FLOWER_POLL_S)  # Flower's 3 s wait, now 0.05 s
    assert time.monotonic() - t0 < 1.0


def test_messages_can_be_built_outside_a_run():
    from flwr.app import Message, RecordDict

    assert flower_patches.allow_messages_outside_a_run()
    message = Message(RecordDict(), dst_node_id=5, message_type="train")
    assert message.metadata.run_id == 1 and message.metadata.dst_node_id == 5


def test_another_flower_version_is_left_unpatched_with_a_warning(monkeypatch, caplog):
    from flwr.server.superlink.fleet.vce import vce_api

    before = vce_api.add_messages_to_queue
    monkeypatch.setattr(flower_patches, "installed_flower", lambda: "9.9.9")
    monkeypatch.setattr(flower_patches, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="umbel.flower_patches"):
        assert not flower_patches.quicker_engine_poll(nodes=4)
        assert not flower_patches.supernode_timings(poll=0.5, heartbeat=10.0)
        assert not flower_patches.allow_messages_outside_a_run()
    assert vce_api.add_messages_to_queue is before
    assert "flwr 9.9.9" in caplog.text and "runs unpatched" in caplog.text
