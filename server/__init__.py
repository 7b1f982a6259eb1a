"""dprouter's rank servers: headless vLLM data-parallel ranks that join a router."""
