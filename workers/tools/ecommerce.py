"""The seed's four e-commerce tools as throttled Celery tasks (bodies in `catalog`)."""

from __future__ import annotations

from workers.celery import throttle
from workers.tools import catalog

search_products = throttle.tool(catalog.search_products)
get_inventory = throttle.tool(catalog.get_inventory)
lookup_order = throttle.tool(catalog.lookup_order)
process_refund = throttle.tool(catalog.process_refund)

__all__ = ["get_inventory", "lookup_order", "process_refund", "search_products"]
