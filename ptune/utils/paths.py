"""Where ptune's own files are (the repository root, hence ``conf/`` and the built-in model and data), and the
check that a model folder is one.

A module of its own, importing nothing of ptune, so that any module may use it without joining an import circle.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def check_model_dir(path: str | Path) -> Path:
    """Fail at once, naming the folder and the key to fix, instead of deep inside transformers."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path={path}: no such directory. Point model.path at a local model folder.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json in this folder; is it a Hugging Face model?")
    return folder
