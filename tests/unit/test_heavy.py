"""Heavy mode without a sandbox: the vote compares like the verifier and breaks ties by seed, and
reflect mode runs batched with a local model. (Episodes in sandboxes: tests/integration/test_heavy_sandbox.py.)"""

from __future__ import annotations

import torch

from data.render import get_renderer
from sandbox_env.agent.heavy import answer_key, majority_vote, run_heavy
from sandbox_env.agent.rollout import Budgets, TokenCounter, ToolEnv
from sandbox_env.inference.engine import InferenceEngine, SamplingConfig
from sandbox_env.inference.policy import LocalModelPolicy
from sandbox_env.tasks import get_family
from tests.fixtures import tiny_model_and_tokenizer

torch.set_num_threads(1)
ENV = ToolEnv(tools=("python",))


def test_majority_vote_compares_like_the_verifier_and_breaks_ties_by_seed():
    assert answer_key("48,213") == answer_key("48213") == "48213"
    assert majority_vote(["7", "7.0", "8", None], seed=0, task_id="t") == "7"
    assert majority_vote([None, None], seed=0, task_id="t") is None
    picks = {majority_vote(["a", "b", "c"], seed=s, task_id="t") for s in range(40)}
    assert picks == {"a", "b", "c"}  # a tie is not always resolved the same way across seeds...
    for s in range(10):  # ...but always the same way for one seed, whatever the order of the answers
        assert majority_vote(["a", "b", "c"], seed=s, task_id="t") == majority_vote(["c", "a", "b"], seed=s, task_id="t")


def test_run_heavy_reflect_with_a_local_model_runs_batched():
    model, tok = tiny_model_and_tokenizer(seed=0)
    engine = InferenceEngine(model, get_renderer(tok), max_batch_size=4)
    pol = LocalModelPolicy(engine, sampling=SamplingConfig(temperature=1.0, max_new_tokens=24))
    fam = get_family("arith")
    task = fam.make("heldout", 2, 0)
    out = run_heavy(task, pol, ENV, Budgets(max_steps=2, max_total_tokens=64), n=3, mode="reflect", family=fam,
                    seed=0, token_counter=TokenCounter(tok))
    engine.close()
    assert len(out["records"]) == 3 and out["mode"] == "reflect"
    assert out["heavy_correct"] is False  # a random model does not solve arithmetic
    assert engine.stats["max_batch"] >= 2  # the three rollouts decoded together
