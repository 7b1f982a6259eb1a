"""The Python client: the SDK package `dprouter` and runnable examples."""
