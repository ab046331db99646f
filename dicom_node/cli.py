"""The ``dicom-node`` command.

Subcommands arrive with the capabilities they drive; each one is a thin layer over
a module that does the work, so the same code runs from the CLI, the server and tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dicom_node import __version__
from dicom_node.config import DEFAULT_MODEL


def cmd_model_info(args: argparse.Namespace) -> int:
    """Print the model's contract and training record, so an operator can see what runs."""
    import onnxruntime as ort

    path = Path(args.model)
    if not path.is_file():
        print(f"error: no model at {path}", file=sys.stderr)
        return 2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    info = {
        "model": str(path),
        "inputs": {i.name: [d if isinstance(d, int) else str(d) for d in i.shape] for i in sess.get_inputs()},
        "outputs": {o.name: [d if isinstance(d, int) else str(d) for d in o.shape] for o in sess.get_outputs()},
        "metadata": {k: (json.loads(v) if k.endswith(".training") else v) for k, v in sorted(meta.items())},
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the environment and the backend ``auto`` would pick, and why; always exits 0."""
    from dicom_node import doctor
    from dicom_node.config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return doctor.main(args.model or cfg.engine.model, cfg.engine.backend, as_json=args.json, engine=cfg.engine)


def cmd_process(args: argparse.Namespace) -> int:
    """Process CT series on disk into derived series and SEGs."""
    from tqdm import tqdm

    from dicom_node.backends.select import BackendError, select
    from dicom_node.config import ConfigError, load
    from dicom_node.pipeline.process import build_engine, engine_id, process_inputs

    try:
        cfg = load(args.config)
        if args.backend:
            cfg.engine.backend = args.backend
        missing = [p for p in args.input if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"input not found: {missing[0]}")
        backend, why = select(cfg.engine.backend, cfg.engine.model, cfg.engine.threads, cfg.engine.batch)
    except (ConfigError, BackendError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"backend: {why}", file=sys.stderr)
    bars: list = []

    def progress_factory(series):
        bar = tqdm(desc=f"{series.description or series.uid}"[:40], unit="window", leave=False,
                   disable=args.quiet or not sys.stderr.isatty())
        bars.append(bar)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        return update

    engine = build_engine(cfg, backend)
    write_seg = cfg.output.write_seg and not args.no_seg
    outcomes, notes = process_inputs(args.input, Path(args.output), cfg, engine, engine_id(cfg),
                                     write_seg, progress_factory)
    for bar in bars:
        bar.close()
    for note in notes:
        print(f"skipped: {note}", file=sys.stderr)
    for o in outcomes:
        print(o.summary())
    done = [o for o in outcomes if o.status == "done"]
    if not done:
        reasons = [o.reason for o in outcomes] or ["no CT image series found in the input"]
        print(f"error: nothing processed: {reasons[0]}", file=sys.stderr)
        return 2
    return 0 if all(o.status != "failed" for o in outcomes) else 1


def cmd_build_engine(args: argparse.Namespace) -> int:
    """The operator's GPU step, the same code as tools/build_engine.py (main() hands it its arguments)."""
    from dicom_node.backends import build

    return build.main(args.args)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the DICOM node in the foreground until Ctrl-C / SIGTERM."""
    from dicom_node.backends.select import BackendError
    from dicom_node.config import ConfigError, load
    from dicom_node.node import logs
    from dicom_node.node.server import serve

    logs.setup()
    try:
        cfg = load(args.config)
        return serve(cfg, args.backend, args.role)
    except (ConfigError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _peer(args: argparse.Namespace) -> tuple[str, int, str]:
    """HOST, PORT and called AE title: --to/--aet, else our own node from --config (default: embedded)."""
    from dicom_node.config import load

    cfg = load(args.config)
    host, port = cfg.node.host, cfg.node.port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if args.to:
        h, _, p = args.to.rpartition(":")
        if not h or not p.isdigit():
            raise ValueError(f"--to must be HOST:PORT, got {args.to!r}")
        host, port = h, int(p)
    return host, port, args.aet or cfg.node.ae_title


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a DICOM node: the first thing to try when a PACS says it cannot reach us."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_node.node.send import requestor_handlers

    try:
        host, port, aet = _peer(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=aet, evt_handlers=requestor_handlers())
    if not assoc.is_established:
        print(f"echo {aet}@{host}:{port}: association {'rejected' if assoc.is_rejected else 'failed'}",
              file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    print(f"echo {aet}@{host}:{port}: {'ok' if code == 0 else f'status {code:#06x}'}")
    return 0 if code == 0 else 1


def _send_folder(folder: list[str], host: str, port: int, aet: str, calling: str) -> int:
    import pydicom

    from dicom_node.config import Destination
    from dicom_node.node.send import SendError, send_dimse
    from dicom_node.pipeline.series import find_files

    files = []
    for f in find_files(folder):
        try:
            pydicom.filereader.read_file_meta_info(f)
        except Exception:  # noqa: BLE001 - non-DICOM files in a folder are simply not sent
            continue
        files.append(f)
    if not files:
        print("error: no DICOM files found", file=sys.stderr)
        return 2
    dest = Destination(name=f"{aet}@{host}:{port}", kind="dimse", ae_title=aet, host=host, port=port)
    try:
        n = send_dimse(files, dest, calling)
    except SendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"sent {n} instances to {aet}@{host}:{port}")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE a folder of DICOM files to a node (ours or any other)."""
    try:
        host, port, aet = _peer(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _send_folder(args.folder, host, port, aet, args.calling_aet)


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a phantom CTA study and send it to a running node: the whole flow in a minute."""
    import tempfile

    try:
        from dicom_node_lab import phantom
        from dicom_node_lab.phantom_dicom import write_phantom_series
    except ImportError:
        print("error: the demo renders the lab's phantom; install it with pip install -e lab (make venv does)",
              file=sys.stderr)
        return 2
    try:
        host, port, aet = _peer(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                  lesion_margin_mm=5.0)
    print(f"generating a {args.slices}x{args.size}x{args.size} phantom CTA (seed {args.seed}) ...")
    p = phantom.generate((args.slices, args.size, args.size), seed=args.seed, options=opts)
    with tempfile.TemporaryDirectory(prefix="dicom-node-demo-") as tmp:
        write_phantom_series(p, Path(tmp), patient_id=f"DEMO-{args.seed:04d}", patient_name="Demo^Phantom")
        rc = _send_folder([tmp], host, port, aet, args.calling_aet)
    if rc == 0:
        print("the node queues the series once it has been quiet for [jobs] quiet_seconds; watch it on the "
              "node's jobs page (http://127.0.0.1:8080/ by default) or GET /jobs")
    return rc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dicom-node",
                                 description="Calcium-free coronary CTA, delivered through the PACS.")
    ap.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    mi = sub.add_parser("model-info", help="show the ONNX model's contract and training record")
    mi.add_argument("--model", default=str(DEFAULT_MODEL))
    mi.set_defaults(func=cmd_model_info)
    dr = sub.add_parser("doctor", help="show versions, GPU, TensorRT, model and plans, and the backend auto picks")
    dr.add_argument("--config", help="config.toml (default: embedded defaults)")
    dr.add_argument("--model", help="ONNX model (default: the config's engine.model)")
    dr.add_argument("--json", action="store_true", help="machine-readable output")
    dr.set_defaults(func=cmd_doctor)
    pr = sub.add_parser("process", help="remove calcium from CT series on disk (offline)")
    pr.add_argument("input", nargs="+", help="folders or files holding one or more CT series")
    pr.add_argument("output", help="folder that receives the derived series and SEGs")
    pr.add_argument("--config", help="config.toml (default: embedded defaults)")
    pr.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"))
    pr.add_argument("--no-seg", action="store_true", help="do not write the DICOM SEG")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_process)
    be = sub.add_parser("build-engine", add_help=False,
                        help="build a TensorRT plan for this GPU (tools/build_engine.py; --help for its options)")
    be.add_argument("args", nargs=argparse.REMAINDER)
    be.set_defaults(func=cmd_build_engine)
    sub.add_parser("measure-kernel", add_help=False,
                   help="measure a reconstruction kernel's MTF50 and edge lift from a phantom scan, for the "
                        "[engine.scanner_kernels] and [engine.scanner_edge_enhance] tables (--help for its options)")
    sv = sub.add_parser("serve", help="run the DICOM node (C-STORE and STOW-RS in, C-STORE/STOW-RS out)")
    sv.add_argument("--config", help="config.toml (default: embedded defaults)")
    sv.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"))
    sv.add_argument("--role", choices=("all", "receiver", "worker"), default="all",
                    help="all: the single box (default); receiver: DIMSE and STOW-RS into the shared spool and job "
                         "store; worker: claim, process and send (README: Running on several hosts)")
    sv.set_defaults(func=cmd_serve)
    for name, func, text in (("echo", cmd_echo, "C-ECHO a DICOM node (default: ours)"),
                             ("send", cmd_send, "C-STORE a folder of DICOM files to a node"),
                             ("demo", cmd_demo, "send a generated phantom CTA study to a running node")):
        c = sub.add_parser(name, help=text)
        if name == "send":
            c.add_argument("folder", nargs="+", help="folders or files to send")
        c.add_argument("--to", help="HOST:PORT (default: the node in --config)")
        c.add_argument("--aet", help="called AE title (default: the node's)")
        c.add_argument("--calling-aet", default="DICOMNODE-SCU", help="our AE title (default: DICOMNODE-SCU)")
        c.add_argument("--config", help="config.toml whose [node] is the default peer")
        if name == "demo":
            c.add_argument("--slices", type=int, default=48)
            c.add_argument("--size", type=int, default=96, help="rows and columns")
            c.add_argument("--seed", type=int, default=31)
        c.set_defaults(func=func)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-engine"]:  # its own options, --help included, go to the build tool whole
        from dicom_node.backends import build

        return build.main(argv[1:])
    if argv[:1] == ["measure-kernel"]:
        from dicom_node import kernel_measure

        return kernel_measure.main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
