"""Where ptune's own files are: the repository root, hence ``conf/`` and the built-in model and data.

A module of its own, importing nothing of ptune, so that any module may use it without joining an import circle.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
