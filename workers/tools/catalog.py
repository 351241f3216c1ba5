"""The e-commerce tools: catalog search, stock, order lookup and refunds.

Pure functions over the JSON files shipped in `workers/data`, loaded once on first use and
never written. Every tool takes `session_id`, the caller's conversation, so a limit can be
keyed on it; the answers themselves do not depend on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.resources import files
from typing import Any

_DATA_PACKAGE = "workers"
_RESULT_FIELDS = ("sku", "name", "category", "price_cents", "currency", "rating")


@functools.cache
def _load(name: str) -> Any:
    """The parsed contents of `workers/data/<name>.json`."""
    resource = files(_DATA_PACKAGE) / "data" / f"{name}.json"
    return json.loads(resource.read_text(encoding="utf-8"))


def _products() -> list[dict[str, Any]]:
    products: list[dict[str, Any]] = _load("catalog")["products"]
    return products


def _stock() -> dict[str, dict[str, int]]:
    stock: dict[str, dict[str, int]] = _load("inventory")["stock"]
    return stock


@functools.cache
def _orders() -> dict[str, dict[str, Any]]:
    return {order["order_id"]: order for order in _load("orders")["orders"]}


def search_products(
    query: str, session_id: str, category: str | None = None, max_results: int = 5
) -> dict[str, Any]:
    """Products whose name, tags or category contain every word of `query`, ignoring case.

    Best rated first; `total` counts all matches, `results` holds at most `max_results`.
    """
    if max_results < 1:
        raise ValueError(f"max_results must be at least 1, got {max_results}")
    terms = query.lower().split()
    wanted = category.lower() if category is not None else None
    matches = []
    for product in _products():
        if wanted is not None and product["category"].lower() != wanted:
            continue
        text = " ".join([product["name"], product["category"], *product["tags"]]).lower()
        if terms and all(term in text for term in terms):
            matches.append(product)
    matches.sort(key=lambda product: (-product["rating"], product["sku"]))
    return {
        "query": query,
        "results": [{field: p[field] for field in _RESULT_FIELDS} for p in matches[:max_results]],
        "total": len(matches),
        "source": "catalog",
    }


def get_inventory(sku: str, session_id: str) -> dict[str, Any]:
    """Units of `sku` on hand in each warehouse; an unknown SKU has none anywhere."""
    by_warehouse = _stock().get(sku, {})
    warehouses = [{"warehouse": name, "quantity": qty} for name, qty in by_warehouse.items()]
    return {
        "sku": sku,
        "available": sum(by_warehouse.values()),
        "warehouses": warehouses,
        "source": "inventory",
    }


def lookup_order(order_id: str, session_id: str) -> dict[str, Any]:
    """An order's status, items, total and date; `found` is false for an unknown id."""
    order = _orders().get(order_id)
    if order is None:
        return {
            "order_id": order_id,
            "found": False,
            "status": "unknown",
            "items": [],
            "total_cents": 0,
            "created_at": None,
            "source": "orders",
        }
    return {
        "order_id": order_id,
        "found": True,
        "status": order["status"],
        "items": [dict(item) for item in order["items"]],
        "total_cents": order["total_cents"],
        "created_at": order["created_at"],
        "source": "orders",
    }


def process_refund(
    order_id: str, amount_cents: int, reason: str, session_id: str
) -> dict[str, Any]:
    """Approve or reject a refund of `amount_cents` against an order.

    Rejected when the order is unknown, not refundable, or the amount is not between one cent
    and the order total. An approval's `refund_id` is derived from the order and amount, so a
    retried request gets the same id. The order data is not changed.
    """
    order = _orders().get(order_id)
    if order is None:
        return _rejected(order_id, f"Order {order_id} was not found.")
    if not order["refundable"]:
        return _rejected(
            order_id,
            f"Order {order_id} is not eligible for a refund (status: {order['status']}).",
        )
    if amount_cents < 1:
        return _rejected(order_id, "The refund amount must be at least 1 cent.")
    if amount_cents > order["total_cents"]:
        return _rejected(
            order_id,
            f"The refund of {_dollars(amount_cents)} exceeds the order total of "
            f"{_dollars(order['total_cents'])}.",
        )
    digest = hashlib.sha256(f"{order_id}:{amount_cents}".encode()).hexdigest()
    return {
        "order_id": order_id,
        "status": "approved",
        "refund_id": f"RF-{digest[:10].upper()}",
        "amount_cents": amount_cents,
        "message": f"Refund of {_dollars(amount_cents)} approved for order {order_id}.",
    }


def _rejected(order_id: str, why: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "status": "rejected",
        "refund_id": None,
        "amount_cents": 0,
        "message": why,
    }


def _dollars(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"
