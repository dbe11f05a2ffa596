"""gRPC contracts of IceCache; ``python -m proto.build`` generates the Python stubs."""
