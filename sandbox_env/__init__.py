"""Sandboxed tool environments: the bubblewrap sandbox, the model's tools, the search index.

Imports stay light (stdlib only): the rollout workers import this package many times.
"""

from sandbox_env.sandbox import RunResult, Sandbox, SandboxConfig
from sandbox_env.search_index import SearchIndex
from sandbox_env.tools import ToolBox, ToolResult

__all__ = ["Sandbox", "SandboxConfig", "RunResult", "SearchIndex", "ToolBox", "ToolResult"]

# The rollout loop, its policies and the task families (stdlib only as well).
from sandbox_env.policies import AssistantStep, EpisodeState, OpenAITeacher, ScriptedTeacher, ToolCall  # noqa: E402
from sandbox_env.rollout import Budgets, TokenCounter, ToolEnv, run_episode  # noqa: E402
from sandbox_env.tasks import Task, TaskFamily, get_family  # noqa: E402

__all__ += ["AssistantStep", "EpisodeState", "OpenAITeacher", "ScriptedTeacher", "ToolCall", "Budgets", "TokenCounter",
            "ToolEnv", "run_episode", "Task", "TaskFamily", "get_family"]

# The local-model policy, heavy mode and the evaluation metrics import torch: loaded on first use
# (PEP 562), so `import sandbox_env` stays stdlib-only for the rollout workers.
_LAZY = {"LocalModelPolicy": "local_policy", "InferenceEngine": "local_policy", "SamplingConfig": "local_policy",
         "load_policy_model": "local_policy", "run_heavy": "heavy", "majority_vote": "heavy",
         "teacher_forced_divergence": "metrics", "wilson_interval": "metrics"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sandbox_env.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sandbox_env' has no attribute {name!r}")
