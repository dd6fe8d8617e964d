"""The sweep's end: the Hydra callback, the post-sweep pipeline and its steps."""
