# The edge agent: `splitexit edge run|refine` on ONNX Runtime, without torch. It runs a
# bundle exported with ONNX segments (`splitexit export --edge-engine onnx`, the default).
# Build from the repository root:
#   docker build -f deploy/docker/edge.Dockerfile -t splitexit-edge .
# Run once over a folder of inputs (the bundle mounted, never baked in):
#   docker run --rm -v "$PWD/runs/bundle:/bundle:ro" -v "$PWD/inbox:/inbox:ro" \
#     -v splitexit-out:/var/lib/splitexit splitexit-edge \
#     edge run /bundle --input /inbox --worker HOST:50051 \
#     --out /var/lib/splitexit/out/results.jsonl --spool /var/lib/splitexit/spool
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPLITEXIT_CACHE=/tmp/splitexit-cache

RUN groupadd --system --gid 10001 splitexit \
 && useradd --system --uid 10001 --gid splitexit --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin splitexit \
 && mkdir -p /var/lib/splitexit/out /var/lib/splitexit/spool \
 && chown -R splitexit:splitexit /var/lib/splitexit

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY edge/ edge/
COPY cloud/ cloud/
COPY sim/ sim/
COPY protos/ protos/
# the core (numpy, grpcio, protobuf, zeroconf, msgpack, Pillow) and onnxruntime: no torch
RUN pip install --no-cache-dir './[edge]' \
 && rm -rf /src

WORKDIR /var/lib/splitexit
USER 10001:10001
VOLUME ["/bundle", "/var/lib/splitexit"]
# A one-shot job (it answers every input, then exits) has nothing to probe between runs.
HEALTHCHECK NONE
ENTRYPOINT ["splitexit"]
CMD ["edge", "run", "--help"]
