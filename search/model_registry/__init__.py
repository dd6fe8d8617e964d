"""The model registry: model store, champion gate and its lock, promotion records, model card."""
