"""pynydus: Nydus image acceleration for containerd, written in Python."""

__version__ = "0.1.0"
