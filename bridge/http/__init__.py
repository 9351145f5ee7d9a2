"""HTTP, both ways: serving an app (uvicorn, the one error boundary, bounded strict
bodies, list pages, offline API docs, the load balancer's forwarded headers,
Server-Sent-Events framing) and sending on a user's behalf (``outbound``: where the
product may connect, and the one client that obeys it)."""
