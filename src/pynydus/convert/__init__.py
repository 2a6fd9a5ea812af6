"""OCI image → Nydus image (``pynydus convert``, upstream's nydusify) and the
image checker (``pynydus check-image``).

* :mod:`.image`     manifests, indexes, configs: parse, select, rewrite (sans-I/O)
* :mod:`.pack`      inline layer blobs and the bootstrap layer (bytes)
* :mod:`.layer`     one layer → one blob, streamed, cached (runs in worker processes)
* :mod:`.bootstrap` per-layer bootstraps → the image bootstrap, chunks shared across layers
* :mod:`.converter` the orchestration: pull, convert in parallel, push, tag last
* :mod:`.overlay_view`, :mod:`.check`  source layers flattened vs the Nydus image
* :mod:`.progress`  rich bars at a terminal, log lines otherwise
"""
