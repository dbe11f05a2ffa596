"""``icecache.v1``: the cache service and worker contracts, and their generated stubs."""

from proto.build import missing

if missing():
    raise ImportError(
        "the gRPC stubs of proto/icecache/v1 are not generated: run `make proto` "
        "(or `python -m proto.build`; it needs grpcio-tools, from `pip install -e '.[dev]'`)"
    )
