"""`python -m sandbox_env.serve`: a checkpoint as an OpenAI-compatible server (sandbox_env/inference/server.py)."""

from __future__ import annotations


def _main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from sandbox_env.inference.server import serve

    @hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
    def main(cfg) -> None:
        serve(OmegaConf.to_container(cfg, resolve=True))

    main()


if __name__ == "__main__":
    _main()
