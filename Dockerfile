# One image for every throttle service: workers, Flower, the demo producer.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY throttle ./throttle
COPY workers ./workers
COPY config ./config
RUN pip install --no-cache-dir ".[gevent]"
ENV THROTTLE_CONFIG=/app/config/tools.toml
CMD ["celery", "-A", "workers", "worker", "-l", "INFO"]
