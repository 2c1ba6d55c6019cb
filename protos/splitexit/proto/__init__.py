"""Wire protocol: `.proto` files and their generated code (proto package splitexit.v1).

The generated modules are imported explicitly (`from splitexit.proto import
inference_pb2`), never from here: this package stays import-free so that `generate` and
PROTOCOL_VERSION cost nothing.
"""

# ModelInfo.protocol_version: bump when the meaning of a field in inference.proto changes
# incompatibly (adding fields does not).
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION"]
