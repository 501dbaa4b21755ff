pytest_plugins = ["harness.cluster_plugin"]
