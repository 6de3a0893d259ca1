"""``ptune serve``: two processes. The HTTP process (``app``: the service, routes and command line; ``protocol``:
errors, the request gate, request bodies; ``reference``: ChatGLM2's ``POST /``; ``client``: its side of the
engine) never imports torch. The engine process (``engine``: the model and its busy loop; ``scheduler``:
continuous batching) owns the model. ``ipc`` is the sockets and messages between them.

The only package that knows HTTP routes. May import ``ptune.frontends`` (their shared start) and everything below.
"""
