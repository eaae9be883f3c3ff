"""Sandboxed tool environments: the bubblewrap sandbox, the model's tools, the search index.

Imports stay light (stdlib only): the rollout workers import this package many times.
"""

from sandbox_env.sandbox import RunResult, Sandbox, SandboxConfig
from sandbox_env.search_index import SearchIndex
from sandbox_env.tools import ToolBox, ToolResult

__all__ = ["Sandbox", "SandboxConfig", "RunResult", "SearchIndex", "ToolBox", "ToolResult"]
