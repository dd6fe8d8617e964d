-- Run once by the postgres image on a new volume (docker-compose.yml mounts it): a database per store,
-- because Optuna and MLflow both keep an alembic_version table.
CREATE DATABASE mlflow OWNER sweeps;
