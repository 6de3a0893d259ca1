"""Train a P-tuning v2 prefix on a frozen causal LM.

    python train.py                                   # built-in offline default (tiny GLM, synthetic data)
    python train.py max_steps=60 prefix.length=32     # override anything in conf/
    python train.py -m prefix.length=8,16 learning_rate=1e-2,2e-2   # a sweep: multirun/DATE/TIME/0..3
    python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 ...   # its jobs in parallel (sweep extra)
    python train.py -m hydra/sweeper=prefix_search objective=rouge-l       # an Optuna search (sweep extra)
    python train.py --help                            # the composed config and the groups to choose from

Returns the objective (``objective=``): the final eval loss (minimised) or a generation metric (maximised).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ptune.checkpoints.config_checks import check_train_config, check_train_paths
from ptune.training.hydra_setup import route_library_logs, run_output_dir, run_script
from ptune.training.objective import check_objective
from ptune.training.sweeps import cap_torch_threads, check_plugin_choices, check_torchrun_sweep


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    check_train_config(cfg)  # before torch and transformers load (~5 s): a bad setting is refused at once
    check_train_paths(cfg)
    check_objective(cfg)
    from ptune.training.recipe import train  # here, not at the top: --help and a refused command line import no torch

    route_library_logs()
    cap_torch_threads(cfg.torch_threads)
    return train(cfg, run_output_dir())


if __name__ == "__main__":
    check_plugin_choices(sys.argv[1:], Path(__file__).resolve().parent / "conf")
    check_torchrun_sweep(sys.argv[1:])
    run_script(main, "train.py", "train")  # an error you can fix: one line (HYDRA_FULL_ERROR=1: the traceback)
