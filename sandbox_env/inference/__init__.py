"""Our checkpoints as agents: loading any checkpoint kind (`loading`), the batched KV-cached engine
(`engine`), the local-model policy of the rollout loop (`policy`), the OpenAI-compatible server
(`server`). Imports torch."""
