"""IceCache worker: model runner, paged KV on the device, attention policies, gRPC server."""
