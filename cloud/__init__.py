"""Cloud worker: serves the tail of a split model over gRPC.

Filled by the edge-cloud runtime issue (servicer, batcher, server builder, advertiser).
"""
