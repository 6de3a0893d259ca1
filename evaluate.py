"""Score P-tuning checkpoints with ROUGE-1/2/L and BLEU-4 as the reference ChatGLM2 recipe defines them.

python evaluate.py checkpoint=outputs/DATE/TIME/checkpoint-200   # one checkpoint (its config says the rest)
python evaluate.py checkpoint=outputs/DATE/TIME                  # a run: every checkpoint, table and plot
python evaluate.py checkpoint=multirun/DATE/TIME max_samples=100 # a sweep
python evaluate.py predictions=generated_predictions.jsonl       # score a predictions file only
python evaluate.py --help                                        # every option (conf/evaluate.yaml)
"""

import hydra
import torch
from omegaconf import DictConfig

from ptune.evaluation.scoring import evaluate_target, score_predictions
from ptune.training.hydra_setup import route_library_logs


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    route_library_logs()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    if bool(cfg.checkpoint) == bool(cfg.predictions):
        raise SystemExit("evaluate.py: give exactly one of checkpoint=PATH or predictions=PATH (see --help)")
    if cfg.predictions:
        score_predictions(cfg.predictions, cfg.metric_processes)
    else:
        evaluate_target(cfg)


if __name__ == "__main__":
    main()
