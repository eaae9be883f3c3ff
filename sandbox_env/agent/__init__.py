"""The agent loop: one shape of tool call and assistant turn (`types`), the teachers (`teachers`),
the rollout loop with budgets and context management (`rollout`), heavy mode (`heavy`). Stdlib only."""
