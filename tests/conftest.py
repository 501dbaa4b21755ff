pytest_plugins = ["harness.model_plugin", "harness.cluster_plugin"]
