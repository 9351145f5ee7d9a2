"""The on-prem service: Pudu webhook in, durable outbox, MQTT out."""
