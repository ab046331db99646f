"""The fastest durable receiver pynetdicom's public API allows: the ceiling for any node built on it.

Issue 19 asks the node to receive at 1.2× Orthanc's durable rate while keeping to pynetdicom's
public API. This receiver does the least any durable receiver must: for each C-STORE it takes
the encoded data set from pynetdicom, writes it to a new file, renames it into place, fsyncs
(the node spool's default "journal" durability: one journal commit for the data and the name)
and answers Success. No header checks, no job database, no spool layout, no
logging. Whatever rate it reaches in the same run as Orthanc bounds what the node can reach
with pynetdicom in one process; `python tools/bench.py ingest` runs it beside the node.

    python -m dicom_node_lab.bare_scp --port 11113 --out /tmp/bare [--ae-title BARE]
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def durable_write(folder: Path, name: str, data: bytes, sync: Callable[[int], None] = os.fsync) -> None:
    """New file, atomic rename, fsync: what the node's spool does by default (spool.durability "journal").

    ``bench.py`` times the same write alone (the fsync ceiling, and ``durable-write`` with ``os.fdatasync``).
    """
    part = folder / f".{name}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.replace(part, folder / f"{name}.dcm")
        sync(fd)
    finally:
        os.close(fd)


def serve(port: int, out: Path, ae_title: str = "BARE", ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> None:
    """Receive until ``stop`` is set (main(): SIGTERM or SIGINT); every acknowledged instance is on disk."""
    out.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1 << 62))
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        data = event.encoded_dataset()  # what arrived, as received, behind a file meta group
        with lock:
            name = f"{next(counter):09d}"
        try:
            durable_write(out, name, data)
        except OSError:
            return OUT_OF_RESOURCES
        return SUCCESS

    ae = AE(ae_title=ae_title)
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if ready is not None:
        ready.set()
    try:
        (stop or threading.Event()).wait()
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ae-title", default="BARE")
    args = ap.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(args.port, args.out, args.ae_title, stop=stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
