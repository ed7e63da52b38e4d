"""Tests that run against the real test bed (control plane, test kubelet, SeaweedFS, Prometheus)."""
