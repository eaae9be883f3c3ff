"""`python -m train`: the training job's Hydra entry point (the recipe is train/recipe.py, the schema train/config.py).

    python -m train data.path=outputs/trajectories                  # tiny model, one process
    python -m train data.path=... qat=none optim.lr=1e-3 max_steps=500      # BF16: no fake quant
    accelerate launch --config_file conf/accelerate/zero3.yaml -m train data.path=... model=qwen3_30b_a3b model.path=/ckpt
"""

import train.config  # noqa: F401  registers train_schema, which conf/train.yaml composes onto
from qat.jobs import job


@job("train")
def main(cfg) -> None:
    from train.recipe import run

    run(cfg)


if __name__ == "__main__":
    main()
