"""``make viewer``: Orthanc, the node and OHIF on loopback, with a demo study routed through the node.

A newcomer sees the product as a radiologist does within a minute: a phantom CTA goes into
Orthanc (the PACS) by C-STORE, Orthanc routes it to the node, the node sends back the
derived series, the SEG and the lesion report, and OHIF shows them beside the original.
Everything runs from a temporary folder and stops with Ctrl-C.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pydicom

from dicom_node_lab import phantom
from dicom_node_lab.peers import NodeProcess, Orthanc, free_port, storescu, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series
from dicom_node_lab.viewer import ViewerSite, ohif_dist

DEMO_SHAPE = (64, 128, 128)
DEMO_SEED = 31


def run_demo(port: int) -> int:
    ohif_dist()
    with tempfile.TemporaryDirectory(prefix="dicom-node-viewer-") as tmp:
        root = Path(tmp)
        node_dicom, node_http = free_port(), free_port()
        orthanc = Orthanc(root / "orthanc", node_dicom, node_http, "dimse")
        viewer = f"http://127.0.0.1:{port}/viewer?StudyInstanceUIDs={{study}}&hangingProtocolId=@ohif/mnGrid"
        cfg = write_node_config(root, dicom_port=node_dicom, http_port=node_http,
                                allowed=[("ORTHANC", "127.0.0.1"), ("STORESCU", "127.0.0.1")],
                                destinations=[{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                                               "host": "127.0.0.1", "port": orthanc.dicom_port}],
                                extra={"viewer": [f'url_template = "{viewer}"']})
        node = NodeProcess(cfg, node_http, node_dicom, root / "node.log")
        site = None
        try:
            print("starting the node and Orthanc ...", flush=True)
            node.start()
            orthanc.start()
            site = ViewerSite(orthanc.url, port=port).start()
            cta = root / "cta"
            cta.mkdir()
            opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                          lesion_margin_mm=5.0)
            write_phantom_series(phantom.generate(DEMO_SHAPE, seed=DEMO_SEED, options=opts), cta,
                                 patient_id="DEMO-VIEWER", patient_name="Demo^Viewer")
            study = str(pydicom.dcmread(next(cta.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
            print(f"sending a {DEMO_SHAPE[0]}-slice phantom CTA to Orthanc; it routes it to the node ...", flush=True)
            storescu(("127.0.0.1", orthanc.dicom_port), orthanc.aet, cta)

            def back() -> bool:
                names = [s["MainDicomTags"].get("SeriesDescription", "") for s in orthanc.study_series(study)]
                return any(n.endswith(" SEG") for n in names) and any(n.endswith(" REPORT") for n in names)
            wait_for(back, 300, "the derived series, SEG and report back in Orthanc", interval=1.0)
            time.sleep(2.0)  # the last derived instances settle in Orthanc's index
            print(f"\nOHIF:        {site.viewer_url(study)}\n"
                  f"node jobs:   {node.url}/\n"
                  f"Orthanc:     {orthanc.url}/app/explorer.html\n"
                  "(double-click the SEG thumbnail to lay it on the original; Ctrl-C stops everything)", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping")
        finally:
            if site is not None:
                site.stop()
            orthanc.stop()
            node.stop()
    return 0
