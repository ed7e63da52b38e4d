"""The test bed: real Kubernetes, S3 and Prometheus components on 127.0.0.1, plus a test kubelet.

- ``build``: builds or finds the binaries (``tests/testbed/build``).
- :mod:`.processes`: start, wait for and stop local processes.
- :mod:`.cluster`: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.
- :mod:`.kubelet`: fake GPU nodes whose pods run as local processes (:mod:`.images`, :mod:`.containers`),
  or as podman containers for the project's images (:mod:`.podman`, which also builds them).
- :mod:`.kueue`: Kueue's controller manager and webhooks.
- :mod:`.s3`: SeaweedFS with its S3 gateway. :mod:`.prometheus`: Pushgateway and Prometheus.
- :mod:`.bed`: everything at once, for ``tests/testbed/up`` and ``down``.

See docs/testbed.md.
"""
