"""A service process from start to stop, shared by both services: lifecycle and exit
codes, background tasks, systemd notify and watchdog, logging, the event loop, the command
line (check-config, completion, probe), settings and where they come from (files,
environment, AWS Secrets Manager), pre-start checks, private files, health and version."""
