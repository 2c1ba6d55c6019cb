"""The worker image's HEALTHCHECK: one grpc.health.v1.Health/Check on the worker's own
port; exit 0 when SERVING, 1 otherwise (warming up, draining, down, unreachable).

    SPLITEXIT_HEALTH_TARGET   HOST:PORT (default 127.0.0.1:50051)
    SPLITEXIT_HEALTH_SERVICE  the service name (default splitexit.v1.SplitInference)

Plaintext only: a worker started with --tls-cert needs another check (the Health service
is exempt from --token-file, so a token is no obstacle). Kubernetes ignores HEALTHCHECK and
uses its native gRPC probes (deploy/k8s/base/deployment.yaml).
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    target = os.environ.get("SPLITEXIT_HEALTH_TARGET", "127.0.0.1:50051")
    service = os.environ.get("SPLITEXIT_HEALTH_SERVICE", "splitexit.v1.SplitInference")
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0)
        except grpc.RpcError as exc:
            print(f"{target} {service or '(server)'}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
