"""``ptune serve``: the HTTP API (``app``), its model-free HTTP layer (``protocol``: errors, the request gate,
request bodies), ChatGLM2's reference ``POST /`` (``reference``) and the batching scheduler (``scheduler``).

The only package that knows HTTP routes. May import ``ptune.frontends`` (their shared start) and everything below.
"""
