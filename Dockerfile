# Sweep worker image: `docker compose build worker` (see docker-compose.yml); the repo is installed as in the README.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e ".[postgres]" --config-settings editable_mode=compat
ENV TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "search/run.py"]
