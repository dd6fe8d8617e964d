"""MLflow tracking: runs, tag keys, params, names, descriptions, model logging, serving contract."""
