"""The reactor race that lost a C-STORE answer in CI, made wide enough to hit every time.

pynetdicom 3 pauses a requesting association's reactor before each ``send_*`` by reading a flag the
reactor sets *before* it waits; a reactor thread switched out just after its wait returned leaves the
flag stale, and it then takes the answer itself. Here the reactor is slowed right after its wait (as a
thread switch would) and the sender right after its request goes out (the answer then sits in the queue):
pynetdicom's own checkpoint loses an answer, ``dicom_node.node.send.ReactorGate`` loses none.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.node.send import ReactorGate, requestor_handlers

REACTOR_LAG = 0.02  # seconds the reactor stalls after each wait returns
SENDER_LAG = 0.05  # seconds the sender stalls after its request goes out, before it reads the answer


class _SlowEvent(threading.Event):
    """pynetdicom's checkpoint, with the reactor switched out after every wait."""

    def wait(self, timeout: float | None = None) -> bool:
        ok = super().wait(timeout)
        time.sleep(REACTOR_LAG)
        return ok


class _SlowGate(ReactorGate):
    """Our gate, with the reactor switched out after every wait alike."""

    def wait(self, timeout: float | None = None) -> bool:
        ok = super().wait(timeout)
        time.sleep(REACTOR_LAG)
        return ok


@pytest.fixture
def echo_scp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def _echoes(port: int, checkpoint: type, count: int = 5) -> list[int]:
    """C-ECHO ``count`` times over one association whose reactor checkpoint is ``checkpoint``; the status
    of each until the first answer that never came (-1), after which pynetdicom has aborted."""
    ae = AE(ae_title="RACER")
    ae.dimse_timeout = 1.0
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHOSCP", evt_handlers=requestor_handlers())
    assert assoc.is_established
    assoc._reactor_checkpoint = checkpoint(assoc) if issubclass(checkpoint, ReactorGate) else checkpoint()
    assoc._reactor_checkpoint.set()
    send = assoc.dimse.send_msg

    def slow_send(*args, **kwargs):
        send(*args, **kwargs)
        time.sleep(SENDER_LAG)

    assoc.dimse.send_msg = slow_send
    statuses: list[int] = []
    try:
        for _ in range(count):
            answer = assoc.send_c_echo()
            statuses.append(int(answer.Status) if "Status" in answer else -1)
            if statuses[-1] < 0:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def test_pynetdicoms_checkpoint_loses_an_answer_when_the_reactor_is_switched_out(echo_scp: int) -> None:
    """The control: the race is real with the stock checkpoint (each echo loses ~95 % of the time)."""
    assert _echoes(echo_scp, _SlowEvent)[-1] == -1


def test_the_gate_keeps_every_answer_for_its_sender(echo_scp: int) -> None:
    assert _echoes(echo_scp, _SlowGate) == [0x0000] * 5


def test_requested_associations_are_gated(echo_scp: int) -> None:
    """requestor_handlers installs the gate before the reactor starts, and the association works."""
    ae = AE(ae_title="RACER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", echo_scp, ae_title="ECHOSCP", evt_handlers=requestor_handlers())
    assert assoc.is_established
    assert isinstance(assoc._reactor_checkpoint, ReactorGate)
    assert [int(assoc.send_c_echo().Status) for _ in range(20)] == [0] * 20
    assoc.release()
    assert assoc.is_released
