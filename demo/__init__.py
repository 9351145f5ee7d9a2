"""The one-command demo (``make run`` = ``python -m demo``): both services in one process.

Run from the checkout, not shipped in the wheel: it is the only place that imports both
``edge_agent`` and ``callback_server``, which otherwise never import each other.
"""
