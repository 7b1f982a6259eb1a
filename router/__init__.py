"""dprouter's router: one process holding vLLM's engine client for all data-parallel
ranks, serving the gRPC Generate, Ranks, Health and reflection services."""
