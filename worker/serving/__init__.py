"""The worker's APIs: gRPC (``icecache.v1.Worker``) and OpenAI-compatible HTTP, one idea a file.

``config`` (what a worker process needs), ``generation`` (one call's admission, checks and
messages, whatever the API), ``servicer`` (gRPC <-> ``generation``), ``http_api`` +
``openai_schema`` (OpenAI's HTTP API <-> ``generation``) + ``http_server`` (uvicorn on a
thread), ``detokenizer`` (incremental text), ``errors`` (failures -> status codes),
``metrics`` (Prometheus), ``server`` (``serve()``: wiring, health, drain). The scheduler
(``worker.scheduler``) owns the engine and batches the decode steps of all requests.
"""
