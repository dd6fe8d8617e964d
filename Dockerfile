# Sweep worker and MLflow server image: `docker compose build` (see docker-compose.yml); CPU TensorFlow unless TF_PACKAGE says otherwise.
FROM python:3.11-slim
ARG TF_PACKAGE="tensorflow>=2.21,<2.22"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 sweeps
WORKDIR /app
# Pinned versions first (a layer that survives code changes), then the project without extras.
COPY requirements.lock /app/requirements.lock
RUN pip install -r requirements.lock "${TF_PACKAGE}" "psycopg[binary]>=3.1"
COPY --chown=sweeps:sweeps . /app
RUN pip install --no-deps -e . --config-settings editable_mode=compat
USER sweeps
ENTRYPOINT ["python", "search/run.py"]
