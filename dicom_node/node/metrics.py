"""Prometheus metrics: what an operator needs to see that the node is alive and keeping up."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dicom_node.node.jobs import JobStore


class _JobStates(Collector):
    """Jobs by state, read from the database at scrape time so the number is never stale."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("dicom_node_jobs", "Jobs by state", labels=["state"])
        for state, n in self.store.counts().items():
            g.add_metric([state], n)
        yield g


class Metrics:
    def __init__(self, store: JobStore) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter("dicom_node_instances_received", "Instances written to the spool",
                                 ["via", "kind"], registry=self.registry)
        self.rejected = Counter("dicom_node_instances_refused", "Instances refused (out of resources, unreadable)",
                                ["via", "status"], registry=self.registry)
        self.associations_rejected = Counter("dicom_node_associations_rejected", "Associations rejected",
                                             ["reason"], registry=self.registry)
        self.http_refused = Counter("dicom_node_http_unauthorized", "HTTP requests refused with 401",
                                    ["reason"], registry=self.registry)
        self.stage = Histogram("dicom_node_stage_seconds", "Duration of each job stage", ["stage"],
                               buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 300, 600, 1800),
                               registry=self.registry)
        self.processing_stage = Histogram("dicom_node_processing_stage_seconds",
                                          "Duration of each step of processing (read, detect, infer, write, ...)",
                                          ["step"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
                                          registry=self.registry)
        self.send_failures = Counter("dicom_node_send_failures", "Failed delivery attempts", ["destination"],
                                     registry=self.registry)
        self.connections_refused = Counter("dicom_node_connections_refused",
                                           "Connections refused before any data was read (DIMSE and HTTP limits)",
                                           ["via", "reason"], registry=self.registry)
        self.http_limited = Counter("dicom_node_http_limited", "HTTP requests refused for a limit (413, 503)",
                                    ["reason"], registry=self.registry)
        self.job_crashes = Counter("dicom_node_job_crashes", "Processing runs that crashed or were killed for a "
                                   "limit", registry=self.registry)
        self.worker_deaths = Counter("dicom_node_worker_deaths", "Worker threads that died and were replaced",
                                     registry=self.registry)
        self.aborted_associations = Counter("dicom_node_associations_aborted", "Associations that ended without a "
                                            "release while instances were arriving", registry=self.registry)
        self.connections_handed = Counter("dicom_node_connections_handed", "DIMSE connections handed to each "
                                          "receiver process (node.receiver_processes > 1)", ["process"],
                                          registry=self.registry)
        self.receiver_restarts = Counter("dicom_node_receiver_restarts", "Receiver processes that ended and were "
                                         "replaced", registry=self.registry)
        self.registry.register(_JobStates(store))
