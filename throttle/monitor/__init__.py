"""What operators see: counters the workers keep, and the commands that read them.

  metrics   the worker's hooks: decisions, runs and store errors counted in memory, flushed
            to Redis every second (and sent as Celery events for Flower)
  stats     the counters' layout in Redis, and the in-process buffer
  queues    broker queue depths (Redis lists, RabbitMQ queues)
  sources   where a command reads from (config, Redis URL, prefix, broker)
  snapshot  one consistent read of every tool's windows, reservations and counters
  status    `throttle status` and `throttle top`
  exporter  `throttle exporter`: Prometheus metrics read from Redis at scrape time
  flower    `throttle flower`: Flower for the workers' app, with basic auth
"""
