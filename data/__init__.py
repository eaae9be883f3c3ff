"""data: trajectories on disk -> training tensors, and prompts/parsing for the rollout loop.

schema   (validate, read and write trajectory records: HF datasets on disk, JSONL)
tokenizer (byte-level BPE + the tiny K2-style chat format, trained by the project)
render   (one renderer interface: tiny K2-style format, or a real model's chat template)
pipeline (split, pack, collate, shard, resume: `build_dataloader`)
report   (`python -m data.report <dataset>`)

Submodules are imported lazily so `import data` stays cheap.
"""
