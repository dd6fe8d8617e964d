# Sweep worker and MLflow server image: `docker compose build` (see docker-compose.yml); CPU TensorFlow unless TF_PACKAGE says otherwise.
FROM python:3.11-slim
ARG TF_PACKAGE="tensorflow>=2.21,<2.22"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 sweeps
WORKDIR /app
# Pinned versions first (a layer that survives code changes), then the project without extras.
COPY requirements.lock /app/requirements.lock
# mlflow[auth]: Flask-WTF, for `mlflow server --app-name basic-auth` (docker/compose.auth.yml);
# the lock's mlflow pin still decides the version.
RUN pip install -r requirements.lock "${TF_PACKAGE}" "psycopg[binary]>=3.1" "mlflow[auth]"
COPY --chown=sweeps:sweeps . /app
RUN pip install --no-deps -e . --config-settings editable_mode=compat
# Mount points owned by the user the server runs as: a new named volume takes this ownership
# (artifacts; the auth app's users), where Docker would otherwise create it root-owned.
RUN mkdir -p /mlartifacts /mlauth && chown sweeps:sweeps /mlartifacts /mlauth
USER sweeps
ENTRYPOINT ["python", "search/run.py"]
