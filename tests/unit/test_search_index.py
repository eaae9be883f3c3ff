"""SearchIndex: a real SQLite FTS5 index, BM25 ranking, snippets, hostile queries, get()."""

import pickle
import sqlite3

import pytest

from sandbox_env import SearchIndex
from sandbox_env.sandbox.search_index import fts5_query

DOCS = [
    {"id": "bridge", "title": "The Orvane Bridge",
     "text": "The Orvane Bridge spans the river Kell. It was built in 1821 by the engineer Tessaly Marr, "
             "whose workshop also made the city's clocks."},
    {"id": "river", "title": "River Kell",
     "text": "The river Kell flows through the city. Several bridges cross the river, the oldest in the north."},
    {"id": "clock", "title": "Clocks of the city",
     "text": "The city's clocks were made in one workshop. Most clocks still run; the river tower clock does not."},
    {"id": "market", "title": "The old market",
     "text": "The market square sits beside the river. Traders sell fish, cloth and clocks on market days."},
]


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    return SearchIndex.build(tmp_path_factory.mktemp("idx") / "corpus.db", DOCS)


def test_is_a_real_fts5_index(idx):
    conn = sqlite3.connect(idx.db_path)
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'docs_fts'").fetchone()[0]
    assert "fts5" in sql.lower()
    assert len(idx) == len(DOCS)


def test_bm25_ranks_the_rare_term_first(idx):
    # "tessaly" occurs in one document only; "river" and "the" are everywhere
    hits = idx.search("the river Tessaly", k=4)
    assert hits[0]["id"] == "bridge"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(set(h) == {"id", "title", "snippet", "score"} for h in hits)
    # term frequency counts: the document that is all about clocks beats one that mentions them
    assert idx.search("clocks", k=4)[0]["id"] == "clock"
    assert idx.search("river", k=1)[0]["id"] == "river"  # in its title and twice in its text
    assert len(idx.search("river", k=2)) == 2


def test_snippets_highlight_matches(idx):
    hit = idx.search("engineer", k=1)[0]
    assert hit["id"] == "bridge" and "[engineer]" in hit["snippet"]
    assert "Tessaly" in hit["snippet"]


@pytest.mark.parametrize("query", [
    'bridge"', '"', "AND", "OR NOT", "bridge AND", "NEAR(bridge river)", "bri*", "title:bridge",
    "-river", "^clock", "(((", "'); DROP TABLE docs; --", "river + kell : {x}", "🙂 brücke", "\x00", "",
    "   ", "!!!", "a" * 5000,
])
def test_hostile_queries_never_crash(idx, query):
    hits = idx.search(query, k=3)
    assert isinstance(hits, list) and len(hits) <= 3
    assert len(idx) == len(DOCS)  # and nothing was dropped


def test_operators_are_taken_literally(idx):
    # "title:bridge" must not become a column filter, nor "NOT" an operator
    assert idx.search("title:bridge", k=1)[0]["id"] == "bridge"
    assert {h["id"] for h in idx.search("NOT river", k=4)} >= {"river"}
    assert fts5_query('a "b" c*') == '"a" OR "b" OR "c"'
    assert idx.search("!!!") == []


def test_get(idx):
    assert idx.get("clock") == DOCS[2]
    assert idx.get("nope") is None
    assert idx.get("' OR 1=1 --") is None


def test_reopen_and_pickle(idx):
    again = SearchIndex(idx.db_path)
    assert again.search("Tessaly", k=1)[0]["id"] == "bridge"
    clone = pickle.loads(pickle.dumps(again))  # for multiprocessing rollout workers
    assert clone.get("bridge") == DOCS[0]


def test_build_validates_documents(tmp_path):
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        SearchIndex.build(tmp_path / "dup.db", [{"id": "a", "title": "t", "text": "x"}] * 2)
    with pytest.raises(ValueError, match="text"):
        SearchIndex.build(tmp_path / "bad.db", [{"id": "a", "title": "t"}])
    assert not (tmp_path / "dup.db").exists() and not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ValueError, match="does not exist"):
        SearchIndex(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(ValueError, match="not a search index"):
        SearchIndex(tmp_path / "junk.db")


def test_search_argument_errors(idx):
    with pytest.raises(ValueError, match="k must be a positive int"):
        idx.search("river", k=0)
    with pytest.raises(TypeError, match="query must be str"):
        idx.search(None)
