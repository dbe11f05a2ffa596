"""The ``icecache`` protobuf package."""
