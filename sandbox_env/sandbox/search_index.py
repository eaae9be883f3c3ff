"""BM25 search over a local document corpus, in a real SQLite FTS5 index.

The `search` and `open` tools of the model read from this index. It replaces a web search API
with something local, deterministic and fast, so trajectories are reproducible and need no
network. The one idea: SQLite's FTS5 already is a BM25 search engine in the standard library;
we store the documents in a plain table (for `get` by id) and index them with an
external-content FTS5 table (for ranked `search` with highlighted snippets), and never let a
user query reach the FTS5 query language unescaped.

    idx = SearchIndex.build("corpus.db", [{"id": "d1", "title": "...", "text": "..."}])
    idx.search("when was the Orvane bridge built", k=5)  # [{"id", "title", "snippet", "score"}]
    idx.get("d1")                                        # {"id", "title", "text"} or None
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterable

# Title matches weigh more than body matches: a document *about* the term beats one that
# merely mentions it. Passed to bm25() in column order (title, text).
TITLE_WEIGHT = 3.0
TEXT_WEIGHT = 1.0
_TOKEN = re.compile(r"\w+", re.UNICODE)


def fts5_query(query: str) -> str:
    """A user's free-text query as a safe FTS5 query: its words, each quoted, joined by OR.

    Quoting turns every FTS5 operator (AND, NEAR, *, ^, :, column filters, parentheses,
    quotes) into a literal term, so no input can raise a syntax error. OR (not FTS5's implicit
    AND) because BM25 then ranks partial matches instead of returning nothing.
    """
    terms = dict.fromkeys(t.lower() for t in _TOKEN.findall(query))  # dedupe, keep order
    return " OR ".join(f'"{t}"' for t in terms)


class SearchIndex:
    """An open, read-only search index. Safe to share across threads; picklable (reopens by path)."""

    def __init__(self, db_path: str | os.PathLike):
        self.db_path = os.fspath(db_path)
        if not os.path.isfile(self.db_path):
            raise ValueError(f"search index {self.db_path!r} does not exist; build it with "
                             "SearchIndex.build(db_path, docs)")
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False)
        try:
            self._n_docs = self._conn.execute("SELECT count(*) FROM docs").fetchone()[0]
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise ValueError(f"{self.db_path!r} is not a search index built by SearchIndex.build ({e})") from None

    @classmethod
    def build(cls, db_path: str | os.PathLike, docs: Iterable[dict]) -> SearchIndex:
        """Writes a new index of `docs` ({"id", "title", "text"}, ids unique) to db_path, atomically."""
        db_path = os.fspath(db_path)
        tmp = f"{db_path}.tmp-{os.getpid()}"
        if os.path.exists(tmp):
            os.remove(tmp)
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript("""
                PRAGMA journal_mode = OFF;
                PRAGMA synchronous = OFF;
                CREATE TABLE docs (rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
                                   title TEXT NOT NULL, text TEXT NOT NULL);
                CREATE VIRTUAL TABLE docs_fts USING fts5(
                    title, text, content='docs', content_rowid='rowid', tokenize='unicode61');
            """)
            n = 0
            for i, doc in enumerate(docs):
                if not isinstance(doc, dict):
                    raise TypeError(f"SearchIndex.build: document {i} must be a dict with 'id', 'title', "
                                    f"'text', got {type(doc).__name__}")
                missing = [f for f in ("id", "title", "text") if not isinstance(doc.get(f), str)]
                if missing:
                    raise ValueError(f"SearchIndex.build: document {i} (id={doc.get('id')!r}) needs str "
                                     f"fields {missing}")
                try:
                    conn.execute("INSERT INTO docs (id, title, text) VALUES (?, ?, ?)",
                                 (doc["id"], doc["title"], doc["text"]))
                except sqlite3.IntegrityError:
                    raise ValueError(f"SearchIndex.build: duplicate document id {doc['id']!r}; ids must be "
                                     "unique") from None
                n += 1
            conn.execute("INSERT INTO docs_fts (rowid, title, text) SELECT rowid, title, text FROM docs")
            conn.execute("INSERT INTO docs_fts (docs_fts) VALUES ('optimize')")
            conn.commit()
        except BaseException:
            conn.close()
            os.remove(tmp)
            raise
        conn.close()
        os.replace(tmp, db_path)
        return cls(db_path)

    def __len__(self) -> int:
        return self._n_docs

    def search(self, query: str, k: int = 5, snippet_tokens: int = 24) -> list[dict]:
        """Top-k documents by BM25 (higher score = better), with a snippet around the matches
        ([brackets] mark matched terms). A query without any word returns []."""
        if not isinstance(query, str):
            raise TypeError(f"SearchIndex.search: query must be str, got {type(query).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"SearchIndex.search: k must be a positive int, got {k!r}")
        match = fts5_query(query)
        if not match:
            return []
        with self._lock:
            rows = self._conn.execute(
                f"""SELECT d.id, d.title,
                           snippet(docs_fts, 1, '[', ']', ' … ', ?),
                           bm25(docs_fts, {TITLE_WEIGHT}, {TEXT_WEIGHT}) AS rank
                    FROM docs_fts JOIN docs d ON d.rowid = docs_fts.rowid
                    WHERE docs_fts MATCH ? ORDER BY rank, d.id LIMIT ?""",
                (min(max(int(snippet_tokens), 1), 64), match, k)).fetchall()
        # FTS5's bm25() is negated (lower = better) so it sorts ascending; flip it for callers.
        return [{"id": i, "title": t, "snippet": s, "score": -r} for i, t, s, r in rows]

    def get(self, doc_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT id, title, text FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else {"id": row[0], "title": row[1], "text": row[2]}

    def close(self) -> None:
        self._conn.close()

    def __getstate__(self):
        return {"db_path": self.db_path}

    def __setstate__(self, state):
        self.__init__(state["db_path"])

    def __repr__(self) -> str:
        return f"SearchIndex({self.db_path!r}, {self._n_docs} docs)"
