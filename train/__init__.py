"""The training job and its parts (python -m train); importing it registers the job schemas with Hydra."""

from . import config  # noqa: F401  train_schema: conf/train.yaml composes onto train.config.TrainConfig
