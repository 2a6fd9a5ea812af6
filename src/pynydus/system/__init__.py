"""The system controller: an HTTP API on a unix socket (``[system] address``) for
operators and node agents: which daemons serve which images, their backends, and
prefetch lists for images about to start. ``controller`` answers, ``server`` listens."""
