"""Agentic environments: the sandbox and its tools, verifiable tasks, the agent loop, our
checkpoints as agents, and their evaluation. One concern per subpackage:

- `sandbox/`   isolation: bubblewrap sessions, the model's tools, the FTS5 search index
- `tasks/`     task families with verifiers and scripted solutions; the synthetic corpus
- `agent/`     tool-call and turn types, teachers, the rollout loop, heavy mode
- `inference/` checkpoint loading, the KV-cached engine, the local policy, the server
- `eval/`      evaluation, metrics, report

Jobs: `python -m sandbox_env.generate | evaluate | serve`. Importing this package stays stdlib-only
(the rollout workers import it many times); names that need torch load on first use (PEP 562).
"""

from sandbox_env.agent.rollout import Budgets, TokenCounter, ToolEnv, run_episode
from sandbox_env.agent.teachers import OpenAITeacher, ScriptedTeacher
from sandbox_env.agent.types import AssistantStep, EpisodeState, Policy, ToolCall
from sandbox_env.sandbox import RunResult, Sandbox, SandboxConfig, SearchIndex, ToolBox, ToolResult
from sandbox_env.tasks import Task, TaskFamily, get_family

__all__ = ["Sandbox", "SandboxConfig", "RunResult", "SearchIndex", "ToolBox", "ToolResult",
           "AssistantStep", "EpisodeState", "Policy", "OpenAITeacher", "ScriptedTeacher", "ToolCall",
           "Budgets", "TokenCounter", "ToolEnv", "run_episode", "Task", "TaskFamily", "get_family"]

_LAZY = {"LocalModelPolicy": "inference.policy", "InferenceEngine": "inference.engine",
         "SamplingConfig": "inference.sampling", "load_policy_model": "inference.loading",
         "run_heavy": "agent.heavy", "majority_vote": "agent.heavy",
         "teacher_forced_divergence": "eval.metrics", "wilson_interval": "eval.metrics"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sandbox_env.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sandbox_env' has no attribute {name!r}")
