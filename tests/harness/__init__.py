"""End-to-end harness: real registry, real containerd, our snapshotter, offline OCI images.

Every component is a context manager that starts one process, records its PID and
stops exactly that PID (never by name), so tests, the demo and the benchmarks can run
beside other people's containerd/registry instances on the same machine. State lives in
short private directories under /var/tmp (unix socket paths are limited to 108 bytes,
and the snapshotter's root to 70).

  registry.Registry          /usr/bin/docker-registry on 127.0.0.1:<free port>, access log
  containerd.Containerd      private /usr/bin/containerd with proxy plugin ``nydus``
  snapshotter.Snapshotter    ``pynydus snapshotter`` as a subprocess (restart, kill -9)
  pynydusd.Pynydusd          ``pynydusd`` as a subprocess, API over its unix socket
  cri.CriImages              CRI ImageService client: pull as kubelet does (cri.* labels)
  oci                        offline multi-layer OCI images, pushed with skopeo
  images                     the e2e images and the in-container rootfs check
  util                       Proc (start/stop by PID), mounts, work dirs, sweep_stale

A crashed run (kill -9 of pytest) leaves its work directories behind with a dead
``owner.pid``; ``python -m tests.harness.sweep`` (or ``PYNYDUS_E2E_SWEEP=1`` for the e2e
suite) cleans them up: recorded processes, containerd shims, daemons, mounts.
"""
