"""Drone Delivery: the reference choreography (HTTP ingestion → Package → Drone Scheduler → Delivery).

::

    client ──HTTP──▶ ingestion gateway ──DeliveryRequested──▶ package
    package ──PackageCreated──▶ drone-scheduler ──DroneAssigned──▶ delivery ──DeliveryScheduled (completed)
    drone-scheduler gives up ──choreograph.failed──▶ package (compensates) ──DeliveryCancelled (failed)

Each service owns its SQLite database (under ``$CHOREOGRAPH_DATA_DIR``, default
``./var/drone_delivery``) and runs in its own process::

    choreograph dev examples.drone_delivery.app:app        # everything, colour-prefixed logs
    python -m examples.drone_delivery.demo                 # or: make demo

Faults can be injected per service with ``CHOREOGRAPH_FAULTS`` (see :mod:`choreograph.faults`).
"""
