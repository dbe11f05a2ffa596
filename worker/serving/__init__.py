"""The worker's gRPC service (``icecache.v1.Worker``), one idea a file.

``config`` (what a worker process needs), ``servicer`` (protobuf <-> scheduler requests),
``detokenizer`` (incremental text), ``errors`` (failures -> status codes), ``metrics``
(Prometheus), ``server`` (``serve()``: wiring, health, drain). The scheduler
(``worker.scheduler``) owns the engine and batches the decode steps of all requests.
"""
