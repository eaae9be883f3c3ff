"""`python -m train`: the training job's Hydra entry point (the recipe is train/recipe.py).

    python -m train data.path=outputs/trajectories                  # tiny model, one process
    python -m train data.path=... qat=none optim.lr=1e-3 max_steps=500
    accelerate launch --config_file conf/accelerate/zero3.yaml -m train data.path=... model=qwen3_30b_a3b model.path=/ckpt
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    from train.recipe import run

    run(cfg)


if __name__ == "__main__":
    main()
