"""Running the simulations' ServerApp and ClientApp on real machines: certificates
(``certs``), Flower's SuperLink and SuperNode processes and runs on them (``deploy``), the
SuperNode launcher with settable timings (``supernode``) and device data export.

Imports server, client and workloads; never simulations.
"""
