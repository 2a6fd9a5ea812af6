"""pynydus: Nydus image acceleration for containerd, written in Python."""

import pynydus._lean  # noqa: F401  (first: dataclasses without inspect)

__version__ = "0.1.0"
