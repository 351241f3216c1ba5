"""The deployable Celery app (`celery -A workers worker -Q tool.search_products`) and its tools.

Settings come from the environment:
  THROTTLE_BROKER_URL      broker (default: THROTTLE_REDIS_URL); amqp://... for RabbitMQ
  THROTTLE_RESULT_BACKEND  result backend (default: THROTTLE_REDIS_URL)
  THROTTLE_REDIS_URL       the gate's Redis (default redis://127.0.0.1:6379/0); for a Redis
                           Cluster, redis+cluster://host:port, with the broker and the
                           result backend set on their own (Celery's are not cluster-aware)
  THROTTLE_CONFIG          tools file (default: config/tools.toml of this project)
  THROTTLE_PREFIX          Redis key prefix of the gate (default "throttle")
  THROTTLE_TASK_EVENTS     "0" turns off task events (on by default, so Flower shows calls,
                           delays and fallbacks; the same as `celery worker -E`)
"""

from __future__ import annotations

import os

from celery import Celery

from throttle import Throttle
from throttle.config_file import PROJECT_CONFIG
from throttle.keys import DEFAULT_PREFIX
from throttle.store import DEFAULT_REDIS_URL
from workers.tools import catalog, llm_tasks

redis_url = os.environ.get("THROTTLE_REDIS_URL", DEFAULT_REDIS_URL)
app = Celery(
    "workers",
    broker=os.environ.get("THROTTLE_BROKER_URL", redis_url),
    backend=os.environ.get("THROTTLE_RESULT_BACKEND", redis_url),
)
app.conf.worker_send_task_events = os.environ.get("THROTTLE_TASK_EVENTS", "1") != "0"
throttle = Throttle(
    app,
    os.environ.get("THROTTLE_CONFIG", str(PROJECT_CONFIG)),
    redis_url,
    prefix=os.environ.get("THROTTLE_PREFIX", DEFAULT_PREFIX),
)

# The seed's four e-commerce tools (bodies in workers/tools/catalog.py) and the LLM tool.
search_products = throttle.tool(catalog.search_products)
get_inventory = throttle.tool(catalog.get_inventory)
lookup_order = throttle.tool(catalog.lookup_order)
process_refund = throttle.tool(catalog.process_refund)
seed_tools = {"search_products": search_products, "get_inventory": get_inventory,
              "lookup_order": lookup_order, "process_refund": process_refund}
chat_tasks = llm_tasks.register(throttle)
chat_completion = chat_tasks.get("chat_completion")

__all__ = ["app", "chat_completion", "chat_tasks", "get_inventory", "lookup_order",
           "process_refund", "search_products", "seed_tools", "throttle"]
