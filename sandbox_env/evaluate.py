"""`python -m sandbox_env.evaluate`: checkpoints as agents on held-out tasks, and the report (sandbox_env/eval/)."""

from __future__ import annotations


def _main() -> None:
    from omegaconf import OmegaConf

    from qat.jobs import job
    from sandbox_env.config import register
    from sandbox_env.eval.evaluate import evaluate

    register()

    @job("evaluate")
    def main(cfg) -> None:
        evaluate(OmegaConf.to_container(cfg, resolve=True))

    main()


if __name__ == "__main__":
    _main()
