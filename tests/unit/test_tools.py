"""ToolBox: the search and open tools against a real index, and every kind of bad call. The python
and shell tools, which need a sandbox, are in tests/integration/test_tools_sandbox.py."""

import json

import pytest

from sandbox_env import SearchIndex, ToolBox, ToolResult
from tests.fixtures import SEARCH_DOCS, SEARCH_LONG_TEXT


@pytest.fixture(scope="module")
def index(search_index):
    return search_index


@pytest.fixture(scope="module")
def retrieval(index):
    """No sandbox needed for search/open only."""
    return ToolBox(index=index, tools=("search", "open"), open_page_chars=1000)


def test_schemas_are_openai_tools(index):
    tb = ToolBox(index=index, tools=("search", "open"))
    schemas = tb.schemas()
    assert [s["function"]["name"] for s in schemas] == ["search", "open"]
    for s in schemas:
        assert s["type"] == "function"
        fn = s["function"]
        assert set(fn) == {"name", "description", "parameters"} and fn["description"]
        params = fn["parameters"]
        assert params["type"] == "object" and params["additionalProperties"] is False
        assert set(params["required"]) <= set(params["properties"])
    json.dumps(schemas)  # serializable as is
    schemas[0]["function"]["name"] = "mutated"  # callers get a copy
    assert tb.schemas()[0]["function"]["name"] == "search"


def test_search_tool(retrieval):
    r = retrieval.call("search", {"query": "Tessaly engineer"})
    assert r.ok and r.content.startswith("1. [doc_id: doc-1] The Orvane Bridge")
    assert "[Tessaly]" in r.content
    r = retrieval.call("search", {"query": "Orvane", "k": 1})
    assert r.ok and "2." not in r.content
    r = retrieval.call("search", {"query": "zzzunknownzzz"})
    assert r.ok and "No documents match" in r.content
    r = retrieval.call("search", {"query": '" AND NEAR( *'})  # FTS5 syntax from the model
    assert r.ok


def test_open_tool_paginates(retrieval):
    r = retrieval.call("open", {"doc_id": "doc-2"})
    n_pages = -(-len(SEARCH_LONG_TEXT) // 1000)
    assert r.ok and f"(page 1 of {n_pages})" in r.content and "page=2" in r.content
    assert SEARCH_LONG_TEXT[:1000] in r.content
    pages = [retrieval.call("open", {"doc_id": "doc-2", "page": p}).content.split("\n\n", 1)[1]
             for p in range(1, n_pages + 1)]
    assert "".join(pages) == SEARCH_LONG_TEXT  # the pages are the whole document, in order
    last = retrieval.call("open", {"doc_id": "doc-2", "page": n_pages})
    assert f"(page {n_pages} of {n_pages})\n" in last.content  # no "read on" hint on the last page
    r = retrieval.call("open", {"doc_id": "doc-2", "page": n_pages + 1})
    assert not r.ok and f"has {n_pages} page(s)" in r.content
    r = retrieval.call("open", {"doc_id": "nope"})
    assert not r.ok and "no document with doc_id 'nope'" in r.content and "search" in r.content
    r = retrieval.call("open", {"doc_id": "doc-1"})
    assert "(page 1 of 1)" in r.content


@pytest.mark.parametrize("name,arguments,expect", [
    ("search", '{"query": "x",}', "not valid JSON"),
    ("search", "{query: x}", "not valid JSON"),
    ("search", "[1, 2]", "must be a JSON object"),
    ("search", "42", "must be a JSON object"),
    ("search", {}, "missing required argument 'query'"),
    ("search", {"query": "x", "limit": 3}, "unexpected argument 'limit'"),
    ("search", {"query": 5}, "argument 'query' must be a string"),
    ("search", {"query": "x", "k": "3"}, "argument 'k' must be an integer"),
    ("search", {"query": "x", "k": True}, "argument 'k' must be an integer"),
    ("search", {"query": "x", "k": 0}, "must be between 1 and 20"),
    ("search", {"query": "x", "k": 500}, "must be between 1 and 20"),
    ("search", {"query": "   "}, "query is empty"),
    ("open", {"doc_id": "doc-1", "page": 0}, "must be >= 1"),
    ("open", {"doc_id": "doc-1", "page": 1.5}, "must be an integer"),
    ("open", None, "missing required argument 'doc_id'"),
    ("python", {"code": "1"}, "no tool named 'python'"),  # not enabled in this ToolBox
    ("browser", {"url": "x"}, "no tool named 'browser'"),
    (None, {}, "no tool named None"),
    (["search"], {}, "no tool named"),
])
def test_bad_calls_return_errors_for_the_model(retrieval, name, arguments, expect):
    r = retrieval.call(name, arguments)
    assert isinstance(r, ToolResult) and not r.ok and r.error
    assert expect in r.content, r.content
    if "no tool named" not in expect and "query is empty" not in expect:
        assert "Expected arguments: a JSON object like" in r.content  # the schema, to correct itself


def test_integral_float_is_accepted_as_integer(retrieval):
    assert retrieval.call("open", '{"doc_id": "doc-2", "page": 2.0}').ok
    args = {"doc_id": "doc-2", "page": 2.0}
    assert retrieval.call("open", args).ok and args["page"] == 2.0 and isinstance(args["page"], float)  # untouched


def test_constructor_checks_its_wiring(index):
    with pytest.raises(ValueError, match="sandbox=None"):
        ToolBox(index=index)  # python/shell without a sandbox
    with pytest.raises(ValueError, match="index=None"):
        ToolBox(sandbox=object(), tools=("python", "search"))
    with pytest.raises(ValueError, match="unknown tool"):
        ToolBox(index=index, tools=("search", "web"))
    with pytest.raises(ValueError, match="search_k"):
        ToolBox(index=index, tools=("search",), search_k=0)


def test_internal_failures_do_not_raise(index, tmp_path):
    broken = SearchIndex.build(tmp_path / "c.db", SEARCH_DOCS)
    tb = ToolBox(index=broken, tools=("search",))
    broken.close()  # the index goes away under the toolbox
    r = tb.call("search", {"query": "Orvane"})
    assert not r.ok and "failed internally" in r.content


def test_compact_declarations_keep_names_parameters_and_types():
    full = ToolBox(sandbox=None, index=None, tools=()).schemas()
    assert full == []
    from sandbox_env.sandbox.tools import _SPECS, TOOL_NAMES, _compact_spec
    for name in TOOL_NAMES:
        c = _compact_spec(name)
        f = _SPECS[name]["parameters"]
        assert set(c["parameters"]["properties"]) == set(f["properties"])
        assert c["parameters"]["required"] == f["required"]
        assert all(c["parameters"]["properties"][p]["type"] == f["properties"][p]["type"] for p in f["properties"])
        assert len(json.dumps(c)) < len(json.dumps(_SPECS[name])) / 2
