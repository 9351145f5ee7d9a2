"""AWS IoT Core over MQTT 5 with mutual TLS: the crt backend's awscrt client (the AWS IoT
Device SDK v2's) with AWS's TLS and limits.

AWS IoT's limits are checked before anything is queued (docs/design-contracts.md): QoS 0/1 only,
payload <= 128 KiB, topic <= 256 bytes and <= 7 slashes, no ``$aws/`` topics. A publish
that breaks one fails at once with a permanent PublishRefusedError (the outbox sets it
aside) instead of getting the connection closed by AWS, as it would be.
"""

from __future__ import annotations

from awscrt import io, mqtt5

from bridge.errors import (
    ConfigError,
    InputError,
    PayloadTooLargeError,
    PublishRefusedError,
    TopicNotAllowedError,
)
from bridge.topic import AWS_MAX_TOPIC_BYTES
from bridge.transport.base import MqttSettings, refused_topic
from bridge.transport.crt import CrtTransport, tls_options

MAX_PAYLOAD = 128 * 1024
MAX_TOPIC_BYTES = AWS_MAX_TOPIC_BYTES
MAX_TOPIC_SLASHES = 7
_PACKET_TOO_LARGE, _TOPIC_INVALID = 0x95, 0x90


def check_aws_limits(topic: str, payload: bytes, qos: int) -> None:
    """Raise what AWS IoT Core would refuse (it disconnects the client instead)."""
    if qos > 1:
        raise InputError("AWS IoT Core supports QoS 0 and 1 only", field="qos")
    if len(payload) > MAX_PAYLOAD:
        raise PayloadTooLargeError(len(payload), MAX_PAYLOAD, "payload (AWS IoT limit)")
    if topic.startswith("$aws/"):
        raise TopicNotAllowedError(topic, "$aws/ topics are reserved by AWS IoT Core")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise TopicNotAllowedError(topic, f"longer than AWS IoT's {MAX_TOPIC_BYTES} bytes")
    if topic.count("/") > MAX_TOPIC_SLASHES:
        raise TopicNotAllowedError(topic, f"more than AWS IoT's {MAX_TOPIC_SLASHES} slashes")


class AwsIotTransport(CrtTransport):
    """awscrt's MQTT 5 client with AWS IoT Core's mutual TLS and limits."""

    backend = "awsiot"
    label = "AWS IoT"
    # awscrt keeps under AWS IoT Core's 100 publishes/s and 512 KiB/s too (as the SDK's
    # builder sets it), behind the publisher's own pacing.
    flow_control = mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
    max_payload = MAX_PAYLOAD

    def __init__(self, settings: MqttSettings) -> None:
        files = settings.tls_files
        if not (files.cert_file and files.key_file):
            raise ConfigError("the awsiot backend needs a client certificate and key "
                              "(MQTT_CERT_FILE, MQTT_KEY_FILE)")
        super().__init__(settings)

    def check_publish(self, topic: str, payload: bytes, qos: int) -> None:
        check_aws_limits(topic, payload, qos)

    def _tls_options(self) -> io.TlsContextOptions:
        """Always mutual TLS (``__init__`` required the pair), whatever the URL's scheme;
        on port 443 with AWS's ALPN."""
        options = tls_options(self.settings.tls_files)
        if self.settings.port == 443 and io.is_alpn_available():
            options.alpn_list = ["x-amzn-mqtt-ca"]
        return options

    def _refusal(self, topic: str, payload: bytes, qos: int) -> PublishRefusedError | None:
        if (invalid := refused_topic(topic)) is not None:
            return invalid
        try:
            check_aws_limits(topic, payload, qos)
        except (InputError, PayloadTooLargeError, TopicNotAllowedError) as exc:
            code = _PACKET_TOO_LARGE if isinstance(exc, PayloadTooLargeError) else _TOPIC_INVALID
            return PublishRefusedError(str(exc), code)
        return None
