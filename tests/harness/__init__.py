"""End-to-end harness: real registry, real containerd, our snapshotter, offline OCI images.

Every component is a context manager that starts one process, records its PID and
stops exactly that PID (never by name), so tests, the demo and the benchmarks can run
beside other people's containerd/registry instances on the same machine. State lives in
short private directories under /var/tmp (unix socket paths are limited to 108 bytes,
and the snapshotter's root to 70).

  registry.Registry          /usr/bin/docker-registry on 127.0.0.1:<free port>
  containerd.Containerd      private /usr/bin/containerd with proxy plugin ``nydus``
  snapshotter.Snapshotter    ``pynydus snapshotter`` as a subprocess
  oci                        offline multi-layer OCI images, pushed with skopeo
"""
