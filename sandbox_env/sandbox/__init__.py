"""Isolation: the bubblewrap session (a persistent python worker and a shell), the model's tools
(python, shell, search, open) and the SQLite FTS5 search index behind `search`. Stdlib only."""

from sandbox_env.sandbox.search_index import SearchIndex
from sandbox_env.sandbox.session import RunResult, Sandbox, SandboxConfig
from sandbox_env.sandbox.tools import ToolBox, ToolResult

__all__ = ["RunResult", "Sandbox", "SandboxConfig", "SearchIndex", "ToolBox", "ToolResult"]
