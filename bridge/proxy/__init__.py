"""The REST ``/mqtt/*`` proxy both apps mount, and the Python API underneath it.

``MqttProxy`` publishes and subscribes on one transport through the ``MessageRouter``,
confined to configured topic prefixes. Subscribers get messages three ways: an
in-process handler (``subscribe_to_topic``), a Server-Sent-Events stream
(``GET /mqtt/stream``), or a signed webhook POST to a ``callback_url``.

Mounting: ``create_proxy_router(proxy)`` returns the ``APIRouter`` when a token is
configured (or an ``authorize`` hook is passed: the callback server's org-scoped keys)
and ``None`` when neither is; ``None`` means the proxy is OFF and the app
mounts nothing (there is no unauthenticated mode)::

    proxy_router = create_proxy_router(proxy)
    if proxy_router is not None:
        app.include_router(proxy_router)

Errors: the endpoints raise ``FleetError``s; the app that mounts the router installs the
one error boundary (``bridge.http.error_boundary.install``), which gives them their status and body.
"""

from __future__ import annotations

from bridge.errors import PayloadTooLargeError, PubackTimeoutError, TopicNotAllowedError
from bridge.proxy.core import MqttProxy
from bridge.proxy.http import (
    ProxyAction,
    ProxyAuthorize,
    PublishBody,
    SubscribeBody,
    UnsubscribeBody,
    create_proxy_router,
)
from bridge.proxy.subscriptions import MessageHandler, RetryPolicy, message_json, sign

__all__ = [
    "MessageHandler",
    "MqttProxy",
    "PayloadTooLargeError",
    "ProxyAction",
    "ProxyAuthorize",
    "PubackTimeoutError",
    "PublishBody",
    "RetryPolicy",
    "SubscribeBody",
    "TopicNotAllowedError",
    "UnsubscribeBody",
    "create_proxy_router",
    "message_json",
    "sign",
]

