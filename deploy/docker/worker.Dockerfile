# The cloud worker: `splitexit cloud serve` on CPU torch.
# Build from the repository root (the build context is the whole checkout):
#   docker build -f deploy/docker/worker.Dockerfile -t splitexit-worker .
# Run, with a bundle directory mounted (never baked in) at /bundle:
#   docker run --rm -p 50051:50051 -p 9100:9100 -v "$PWD/runs/bundle:/bundle:ro" splitexit-worker
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPLITEXIT_CACHE=/tmp/splitexit-cache

RUN groupadd --system --gid 10001 splitexit \
 && useradd --system --uid 10001 --gid splitexit --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin splitexit

# torch first, alone, pinned, from PyTorch's CPU index: on PyPI, torch for Linux x86_64 is
# the CUDA build, which pulls some GB of nvidia-* wheels this CPU worker never uses; the
# CPU-only wheel (2.13.0+cpu) is published only on download.pytorch.org/whl/cpu. Its own
# layer, so that a code change does not download it again. `./[full]` below asks for
# torch==2.13.0, which 2.13.0+cpu satisfies, so pip keeps it.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY edge/ edge/
COPY cloud/ cloud/
COPY sim/ sim/
COPY protos/ protos/
# a regular (not editable) install into site-packages; the sources go afterwards
RUN pip install --no-cache-dir './[full]' \
 && rm -rf /src
COPY deploy/docker/healthcheck.py /usr/local/lib/splitexit/healthcheck.py

WORKDIR /
USER 10001:10001
VOLUME ["/bundle"]
# gRPC (SplitInference, grpc.health.v1.Health, reflection), then Prometheus /metrics
EXPOSE 50051 9100
# grpc.health.v1.Health/Check on the worker's own port: SERVING after the warm-up,
# NOT_SERVING while it drains on SIGTERM (docker stop: give it --grace + a few seconds).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/splitexit/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["splitexit"]
CMD ["cloud", "serve", "/bundle", "--no-advertise", "--metrics-port", "9100"]
