"""`python -m sandbox_env.serve`: a checkpoint as an OpenAI-compatible server (sandbox_env/inference/server.py)."""

from __future__ import annotations


def _main() -> None:
    from omegaconf import OmegaConf

    from qat.jobs import job
    from sandbox_env.config import register
    from sandbox_env.inference.server import serve

    register()

    @job("serve")
    def main(cfg) -> None:
        serve(OmegaConf.to_container(cfg, resolve=True))

    main()


if __name__ == "__main__":
    _main()
