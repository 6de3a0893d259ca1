"""Score P-tuning checkpoints with ROUGE-1/2/L and BLEU-4 as the reference ChatGLM2 recipe defines them.

python evaluate.py checkpoint=outputs/DATE/TIME/checkpoint-200   # one checkpoint (its config says the rest)
python evaluate.py checkpoint=outputs/DATE/TIME                  # a run: every checkpoint, table and plot
python evaluate.py checkpoint=multirun/DATE/TIME max_samples=100 # a sweep
python evaluate.py predictions=generated_predictions.jsonl       # score a predictions file only
python evaluate.py --help                                        # every option (conf/evaluate.yaml)
"""

import hydra
from omegaconf import DictConfig

from ptune.checkpoints.config_checks import check_evaluate_config
from ptune.training.hydra_setup import route_library_logs, run_script


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    check_evaluate_config(cfg)  # before torch and transformers load (~5 s): a bad setting is refused at once
    from ptune.evaluation.command import evaluate_command  # here: --help and a bad command line import no torch

    route_library_logs()
    evaluate_command(cfg)


if __name__ == "__main__":
    run_script(main, "evaluate.py", "evaluate")  # an error you can fix: one line (HYDRA_FULL_ERROR=1: the traceback)
