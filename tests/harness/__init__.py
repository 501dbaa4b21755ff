"""Test harness: a real local Kubernetes control plane with fake GPU nodes (kwok) and MinIO.

See harness.cluster (TestCluster, MinioServer; `python -m harness.cluster up|down`) and
harness.cluster_plugin (the pytest fixtures `cluster`, `minio`, `kubectl`, `namespace`, ...).
"""
