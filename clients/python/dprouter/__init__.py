"""dprouter's Python SDK. `dprouter.v1` holds the stubs generated from protos/ by
`make stubs` (not committed)."""
