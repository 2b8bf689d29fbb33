"""cli.services' Kafka probe leaves the calling thread's event loop as it found it."""
import asyncio
import dataclasses
import threading

from cli import services
from recstream.settings import load


def test_the_kafka_probe_keeps_the_threads_current_event_loop():
    """asyncio.run would leave the thread with no current loop: in the test session, pytest-asyncio's."""
    s = dataclasses.replace(load({}), kafka_bootstrap="127.0.0.1:1")   # nothing listens: the probe says no
    got: dict = {}

    def probe_in_a_thread_of_its_own() -> None:   # its current loop is its own: the session's is not touched
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            got["answer"] = services._kafka_answers(s)
            got["kept"] = asyncio.get_event_loop_policy().get_event_loop() is loop
        except RuntimeError as exc:   # "There is no current event loop in thread ..."
            got["kept"] = exc
        finally:
            loop.close()
    t = threading.Thread(target=probe_in_a_thread_of_its_own)
    t.start()
    t.join(timeout=60)
    assert got == {"answer": False, "kept": True}
