"""gRPC contracts of IceCache; ``make proto`` generates the Python stubs (``proto/build.py``)."""
