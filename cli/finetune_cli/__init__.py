"""The `finetune` command line."""
