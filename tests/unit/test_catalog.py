"""The e-commerce tool bodies against their data and the schemas in config/tools.toml."""

from __future__ import annotations

import inspect
import json
import tomllib
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from workers.tools import catalog

CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "tools.toml"
TOOLS: dict[str, Callable[..., dict[str, Any]]] = {
    "search_products": catalog.search_products,
    "get_inventory": catalog.get_inventory,
    "lookup_order": catalog.lookup_order,
    "process_refund": catalog.process_refund,
}
SESSION = "sess-1"


@pytest.fixture(scope="module")
def tools_config() -> dict[str, Any]:
    with CONFIG_PATH.open("rb") as handle:
        tools: dict[str, Any] = tomllib.load(handle)["tools"]
    return tools


def result_validator(config: dict[str, Any], tool: str) -> Draft202012Validator:
    return Draft202012Validator(config[tool]["result"])


def params_validator(config: dict[str, Any], tool: str) -> Draft202012Validator:
    return Draft202012Validator(config[tool]["params"])


def assert_valid_result(config: dict[str, Any], tool: str, result: dict[str, Any]) -> None:
    errors = [e.message for e in result_validator(config, tool).iter_errors(result)]
    assert errors == [], f"{tool} result {result!r} is not valid: {errors}"


def read_data(name: str) -> Any:
    return json.loads((files("workers") / "data" / f"{name}.json").read_text(encoding="utf-8"))


# --- the config and the functions agree --------------------------------------------------


def test_the_config_declares_exactly_the_four_tools(tools_config: dict[str, Any]) -> None:
    # ... beside the LLM tool (workers/tools/llm.py, tested in test_llm_*.py)
    assert set(tools_config) == set(TOOLS) | {"chat_completion"}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_schema_is_a_valid_draft_2020_12_schema(
    tools_config: dict[str, Any], tool: str
) -> None:
    Draft202012Validator.check_schema(tools_config[tool]["params"])
    Draft202012Validator.check_schema(tools_config[tool]["result"])


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_each_params_schema_names_exactly_the_function_arguments(
    tools_config: dict[str, Any], tool: str
) -> None:
    signature = inspect.signature(TOOLS[tool])
    params = tools_config[tool]["params"]
    assert set(params["properties"]) == set(signature.parameters)
    without_default = {
        name for name, p in signature.parameters.items() if p.default is inspect.Parameter.empty
    }
    assert set(params["required"]) == without_default
    assert params["additionalProperties"] is False


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_fallback_validates_against_its_result_schema(
    tools_config: dict[str, Any], tool: str
) -> None:
    assert_valid_result(tools_config, tool, tools_config[tool]["fallback"])


def test_fallbacks_say_they_are_degraded_answers(tools_config: dict[str, Any]) -> None:
    for tool in ("search_products", "get_inventory", "lookup_order"):
        assert tools_config[tool]["fallback"]["source"] == "fallback"
    refund = tools_config["process_refund"]["fallback"]
    assert refund["status"] == "deferred"
    assert refund["amount_cents"] == 0
    assert "manual review" in refund["message"]


def test_the_config_loads_with_the_throttle_loader() -> None:
    from throttle.config_file import load_config

    config = load_config(CONFIG_PATH)
    assert {name: str(t.limits[0]) for name, t in config.tools.items()} == {
        "search_products": "100/1m",
        "get_inventory": "50/1m",
        "lookup_order": "20/1m",
        "process_refund": "5/1m",
        "chat_completion": "90000/1m",
    }


# --- params schemas ----------------------------------------------------------------------

VALID_CALLS: dict[str, dict[str, Any]] = {
    "search_products": {"query": "coffee", "session_id": SESSION, "category": "kitchen"},
    "get_inventory": {"sku": "SKU-1001", "session_id": SESSION},
    "lookup_order": {"order_id": "ORD-50001", "session_id": SESSION},
    "process_refund": {
        "order_id": "ORD-50001",
        "amount_cents": 100,
        "reason": "arrived damaged",
        "session_id": SESSION,
    },
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_params_schemas_accept_a_well_formed_call(tools_config: dict[str, Any], tool: str) -> None:
    assert params_validator(tools_config, tool).is_valid(VALID_CALLS[tool])


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_params_schemas_reject_unknown_arguments(tools_config: dict[str, Any], tool: str) -> None:
    call = {**VALID_CALLS[tool], "debug": True}
    assert not params_validator(tools_config, tool).is_valid(call)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_params_schemas_require_a_session_id(tools_config: dict[str, Any], tool: str) -> None:
    validator = params_validator(tools_config, tool)
    call = dict(VALID_CALLS[tool])
    del call["session_id"]
    assert not validator.is_valid(call)
    assert not validator.is_valid({**call, "session_id": ""})
    assert not validator.is_valid({**call, "session_id": "s" * 129})
    assert validator.is_valid({**call, "session_id": "s" * 128})


@pytest.mark.parametrize(
    ("tool", "field", "bad"),
    [
        ("search_products", "query", 42),
        ("search_products", "query", ""),
        ("search_products", "query", "   "),
        ("search_products", "query", "q" * 201),
        ("search_products", "category", "toys"),
        ("search_products", "max_results", 0),
        ("search_products", "max_results", 21),
        ("search_products", "max_results", "5"),
        ("search_products", "max_results", 2.5),
        ("get_inventory", "sku", "1001"),
        ("get_inventory", "sku", ["SKU-1001"]),
        ("lookup_order", "order_id", "ORD-1"),
        ("lookup_order", "order_id", 50001),
        ("process_refund", "amount_cents", 0),
        ("process_refund", "amount_cents", -500),
        ("process_refund", "amount_cents", "100"),
        ("process_refund", "amount_cents", True),
        ("process_refund", "reason", ""),
        ("process_refund", "reason", "r" * 501),
        ("process_refund", "session_id", 7),
    ],
)
def test_params_schemas_reject_wrong_types_and_out_of_range_values(
    tools_config: dict[str, Any], tool: str, field: str, bad: Any
) -> None:
    call = {**VALID_CALLS[tool], field: bad}
    assert not params_validator(tools_config, tool).is_valid(call)


def test_search_params_allow_a_null_category_and_the_bounds_of_max_results(
    tools_config: dict[str, Any],
) -> None:
    validator = params_validator(tools_config, "search_products")
    base = {"query": "tent", "session_id": SESSION}
    assert validator.is_valid({**base, "category": None})
    assert validator.is_valid({**base, "max_results": 1})
    assert validator.is_valid({**base, "max_results": 20})


# --- search_products ---------------------------------------------------------------------


def test_search_matches_tags_case_insensitively(tools_config: dict[str, Any]) -> None:
    result = catalog.search_products("BLUETOOTH", SESSION, max_results=20)
    assert {r["sku"] for r in result["results"]} == {"SKU-1001", "SKU-1004", "SKU-1006"}
    assert result["total"] == 3
    assert result["query"] == "BLUETOOTH"
    assert result["source"] == "catalog"
    assert_valid_result(tools_config, "search_products", result)


def test_search_matches_names_and_categories() -> None:
    assert [r["sku"] for r in catalog.search_products("skillet", SESSION)["results"]] == [
        "SKU-2001"
    ]
    assert catalog.search_products("Outdoor", SESSION)["total"] == 8


def test_search_requires_every_word_of_the_query() -> None:
    result = catalog.search_products("coffee electric", SESSION)
    assert {r["sku"] for r in result["results"]} == {"SKU-2003", "SKU-2006"}


def test_search_filters_by_category() -> None:
    everywhere = catalog.search_products("ergonomic", SESSION, max_results=20)
    office = catalog.search_products("ergonomic", SESSION, category="office", max_results=20)
    assert everywhere["total"] > office["total"] > 0
    assert all(r["category"] == "office" for r in office["results"])


def test_search_returns_at_most_max_results_but_counts_every_match(
    tools_config: dict[str, Any],
) -> None:
    result = catalog.search_products("camping", SESSION, max_results=2)
    assert len(result["results"]) == 2
    assert result["total"] == 5
    assert_valid_result(tools_config, "search_products", result)


def test_search_lists_the_best_rated_products_first() -> None:
    results = catalog.search_products("a", SESSION, max_results=20)["results"]
    ratings = [r["rating"] for r in results]
    assert ratings == sorted(ratings, reverse=True)


def test_search_with_no_match_returns_an_empty_valid_answer(
    tools_config: dict[str, Any],
) -> None:
    result = catalog.search_products("hovercraft", SESSION)
    assert result["results"] == []
    assert result["total"] == 0
    assert_valid_result(tools_config, "search_products", result)
    assert catalog.search_products("   ", SESSION)["total"] == 0


def test_search_rejects_a_max_results_below_one() -> None:
    with pytest.raises(ValueError, match="max_results"):
        catalog.search_products("tent", SESSION, max_results=0)


def test_search_at_the_largest_max_results_is_a_valid_result(
    tools_config: dict[str, Any],
) -> None:
    result = catalog.search_products("e", SESSION, max_results=20)
    assert len(result["results"]) == 20
    assert_valid_result(tools_config, "search_products", result)


# --- get_inventory -----------------------------------------------------------------------


def test_inventory_sums_the_stock_of_every_warehouse(tools_config: dict[str, Any]) -> None:
    result = catalog.get_inventory("SKU-1001", SESSION)
    stock = read_data("inventory")["stock"]["SKU-1001"]
    assert result["available"] == sum(stock.values()) > 0
    assert result["warehouses"] == [{"warehouse": w, "quantity": q} for w, q in stock.items()]
    assert result["source"] == "inventory"
    assert_valid_result(tools_config, "get_inventory", result)


def test_inventory_of_a_sold_out_product_is_zero_but_lists_its_warehouses(
    tools_config: dict[str, Any],
) -> None:
    result = catalog.get_inventory("SKU-4001", SESSION)
    assert result["available"] == 0
    assert [w["quantity"] for w in result["warehouses"]] == [0, 0]
    assert_valid_result(tools_config, "get_inventory", result)


@pytest.mark.parametrize("sku", ["SKU-9999", "SKU-5008"])
def test_inventory_of_an_unknown_or_unstocked_sku_is_empty_not_an_error(
    tools_config: dict[str, Any], sku: str
) -> None:
    result = catalog.get_inventory(sku, SESSION)
    assert result == {"sku": sku, "available": 0, "warehouses": [], "source": "inventory"}
    assert_valid_result(tools_config, "get_inventory", result)


# --- lookup_order ------------------------------------------------------------------------


def test_lookup_returns_a_known_order(tools_config: dict[str, Any]) -> None:
    result = catalog.lookup_order("ORD-50001", SESSION)
    assert result["found"] is True
    assert result["status"] == "shipped"
    assert result["total_cents"] == sum(i["qty"] * i["price_cents"] for i in result["items"])
    assert result["created_at"].startswith("2024-")
    assert_valid_result(tools_config, "lookup_order", result)


def test_lookup_of_an_unknown_order_says_not_found(tools_config: dict[str, Any]) -> None:
    result = catalog.lookup_order("ORD-99999", SESSION)
    assert result == {
        "order_id": "ORD-99999",
        "found": False,
        "status": "unknown",
        "items": [],
        "total_cents": 0,
        "created_at": None,
        "source": "orders",
    }
    assert_valid_result(tools_config, "lookup_order", result)


def test_every_shipped_order_looks_up_to_a_valid_result(tools_config: dict[str, Any]) -> None:
    for order in read_data("orders")["orders"]:
        assert_valid_result(
            tools_config, "lookup_order", catalog.lookup_order(order["order_id"], SESSION)
        )


def test_the_result_schema_of_a_real_lookup_requires_the_order_id_and_date(
    tools_config: dict[str, Any],
) -> None:
    result = catalog.lookup_order("ORD-50001", SESSION)
    validator = result_validator(tools_config, "lookup_order")
    assert not validator.is_valid({k: v for k, v in result.items() if k != "order_id"})
    assert not validator.is_valid({k: v for k, v in result.items() if k != "created_at"})
    assert not validator.is_valid({**result, "status": "lost"})


# --- process_refund ----------------------------------------------------------------------


def test_refund_within_the_order_total_is_approved(tools_config: dict[str, Any]) -> None:
    result = catalog.process_refund("ORD-50001", 3499, "damaged skillet", SESSION)
    assert result["status"] == "approved"
    assert result["amount_cents"] == 3499
    assert result["refund_id"].startswith("RF-")
    assert "$34.99" in result["message"]
    assert_valid_result(tools_config, "process_refund", result)


def test_refund_of_the_whole_order_is_approved() -> None:
    total = catalog.lookup_order("ORD-50001", SESSION)["total_cents"]
    assert catalog.process_refund("ORD-50001", total, "return", SESSION)["status"] == "approved"


def test_refund_ids_are_deterministic_for_the_same_order_and_amount() -> None:
    first = catalog.process_refund("ORD-50002", 500, "late", "sess-a")
    again = catalog.process_refund("ORD-50002", 500, "late delivery", "sess-b")
    other = catalog.process_refund("ORD-50002", 501, "late", "sess-a")
    assert first["refund_id"] == again["refund_id"]
    assert first["refund_id"] != other["refund_id"]


def test_refund_over_the_order_total_is_rejected(tools_config: dict[str, Any]) -> None:
    total = catalog.lookup_order("ORD-50001", SESSION)["total_cents"]
    result = catalog.process_refund("ORD-50001", total + 1, "too much", SESSION)
    assert result["status"] == "rejected"
    assert result["refund_id"] is None
    assert result["amount_cents"] == 0
    assert "exceeds" in result["message"]
    assert_valid_result(tools_config, "process_refund", result)


@pytest.mark.parametrize("order_id", ["ORD-50018", "ORD-50009", "ORD-50003"])
def test_refund_of_a_non_refundable_order_is_rejected(
    tools_config: dict[str, Any], order_id: str
) -> None:
    result = catalog.process_refund(order_id, 100, "changed my mind", SESSION)
    assert result["status"] == "rejected"
    assert result["refund_id"] is None
    assert "not eligible" in result["message"]
    assert_valid_result(tools_config, "process_refund", result)


def test_refund_of_an_unknown_order_is_rejected(tools_config: dict[str, Any]) -> None:
    result = catalog.process_refund("ORD-99999", 100, "never arrived", SESSION)
    assert result["status"] == "rejected"
    assert "not found" in result["message"]
    assert_valid_result(tools_config, "process_refund", result)


def test_refund_of_a_non_positive_amount_is_rejected() -> None:
    assert catalog.process_refund("ORD-50001", 0, "zero", SESSION)["status"] == "rejected"


def test_refund_does_not_change_the_order_data() -> None:
    before = read_data("orders")
    catalog.process_refund("ORD-50001", 3499, "damaged", SESSION)
    assert read_data("orders") == before
    assert catalog.lookup_order("ORD-50001", SESSION)["status"] == "shipped"


def test_a_refund_decision_must_carry_the_order_id_and_refund_id(
    tools_config: dict[str, Any],
) -> None:
    result = catalog.process_refund("ORD-50001", 100, "damaged", SESSION)
    validator = result_validator(tools_config, "process_refund")
    assert not validator.is_valid({k: v for k, v in result.items() if k != "refund_id"})
    assert not validator.is_valid({k: v for k, v in result.items() if k != "order_id"})
    assert not validator.is_valid({**result, "refund_id": "RF-nothex"})


# --- the shipped data --------------------------------------------------------------------


def test_the_shipped_data_is_consistent() -> None:
    products = read_data("catalog")["products"]
    skus = {p["sku"] for p in products}
    assert len(skus) == len(products) >= 40
    assert set(read_data("inventory")["stock"]) <= skus
    orders = read_data("orders")["orders"]
    assert len({o["order_id"] for o in orders}) == len(orders) >= 30
    for order in orders:
        assert {i["sku"] for i in order["items"]} <= skus
        assert order["total_cents"] == sum(i["qty"] * i["price_cents"] for i in order["items"])
        if order["status"] in ("refunded", "cancelled"):
            assert order["refundable"] is False
