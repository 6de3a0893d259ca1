"""Train a P-tuning v2 prefix on a frozen causal LM.

    python train.py                                   # built-in offline default (tiny GLM, synthetic data)
    python train.py max_steps=60 prefix.length=32     # override anything in conf/
    python train.py -m prefix.length=8,16 learning_rate=1e-2,2e-2   # a sweep, one folder per job
    python train.py --help                            # the composed config and the groups to choose from

Returns the final eval loss, the objective Hydra sweepers minimise.
"""

import hydra
from omegaconf import DictConfig

from ptune.hydra_setup import route_library_logs, run_output_dir


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from ptune.training import train  # here, not at the top: --help need not import torch and transformers

    route_library_logs()
    return train(cfg, run_output_dir())


if __name__ == "__main__":
    main()
