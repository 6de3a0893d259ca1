"""Checking a composed config before anything is loaded, so a bad value fails at once with its key; and a
checkpoint against the base model and the settings it is resumed or used with.

Hydra takes ``max_steps=abc`` as the string ``"abc"`` and ``+model.flash=true`` as a new key; without a check the
first fails minutes later (after data and model are loaded) with a bare ``TypeError`` and the second is ignored.
Here each knob has a rule (what it must be) and each config group takes only the keys its YAML files define: read
from ``conf/`` itself, so a key added to a group's YAML is known without being listed twice. A structured config
(dataclass schema) would say the same, but it would be a second copy of every group to keep in step with the YAML.

A checkpoint records its base model's config.json and its run's settings; a base whose config differs (another
``rope_theta``) or a resume with a changed schedule (``learning_rate``, ``max_steps``) is refused with the keys that
differ rather than run silently on something else than was trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from ptune.data.reading import file_problem, split_path
from ptune.utils.paths import REPO_ROOT, check_model_dir

logger = logging.getLogger(__name__)

CONF = REPO_ROOT / "conf"
DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value of the wrong type or an unknown key; the message names the key and what it must be."""


@dataclass(frozen=True)
class Rule:
    what: str  # what the value must be, for the message
    ok: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.what}", lambda v: v is None or rule.ok(v))


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices)


INT = Rule("a whole number", _is_int)
POSITIVE_INT = Rule("a whole number >= 1", lambda v: _is_int(v) and v >= 1)
POSITIVE_NUMBER = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Rule("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))
PORT = Rule("a port number (1-65535)", lambda v: _is_int(v) and 1 <= v <= 65535)

#: train.yaml's top-level knobs
TRAIN_RULES = {
    "max_steps": POSITIVE_INT,
    "save_steps": POSITIVE_INT,
    "learning_rate": POSITIVE_NUMBER,
    "seed": INT,
    "resume": optional(STRING),
    "init_from": optional(STRING),
    "max_train_samples": optional(POSITIVE_INT),
    "max_eval_samples": optional(POSITIVE_INT),
    "torch_threads": optional(POSITIVE_INT),
    "allow_base_mismatch": BOOL,
    "prefix.init": one_of("random", "text", "vocab"),
    "prefix.init_text": optional(STRING),
}

#: chat.yaml, shared by ptune chat / web / serve
FRONTEND_RULES = {
    "checkpoint": optional(STRING),
    "model.path": optional(STRING),
    "model.dtype": optional(one_of(*DTYPE_NAMES)),
    "model.prompt.kind": STRING,
    "max_source_length": optional(POSITIVE_INT),
    "generation.max_new_tokens": POSITIVE_INT,
    "generation.do_sample": BOOL,
    "generation.top_p": FRACTION,
    "generation.temperature": NON_NEGATIVE_NUMBER,
    "generation.seed": INT,
    "host": STRING,
    "port": optional(PORT),
    "api_key": optional(STRING),
    "max_input_chars": POSITIVE_INT,
    "max_new_tokens_limit": POSITIVE_INT,
    "torch_threads": optional(POSITIVE_INT),
    "allow_base_mismatch": BOOL,
}

#: evaluate.yaml
EVALUATE_RULES = {
    "checkpoint": optional(STRING),
    "predictions": optional(STRING),
    "output_dir": optional(STRING),
    "max_samples": optional(POSITIVE_INT),
    "batch_size": POSITIVE_INT,
    "force": BOOL,
    "metric_processes": optional(POSITIVE_INT),
    "torch_threads": optional(POSITIVE_INT),
    "allow_base_mismatch": BOOL,
    "model.path": optional(STRING),
    "model.dtype": optional(one_of(*DTYPE_NAMES)),
    "generation.max_new_tokens": optional(POSITIVE_INT),
    "generation.do_sample": BOOL,
    "generation.top_p": FRACTION,
    "generation.temperature": NON_NEGATIVE_NUMBER,
    "generation.seed": INT,
}

_ABSENT = object()

#: groups whose keys are all defined by their YAML files (``trainer`` takes any Seq2SeqTrainingArguments field)
CLOSED_GROUPS = ("dataset", "model", "prefix")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix[:-1]: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= _flat(value, f"{prefix}{key}.")
    return flat


def type_problems(cfg: DictConfig, rules: dict[str, Rule]) -> list[str]:
    """One line per key whose value breaks its rule (keys absent from ``cfg`` are not checked)."""
    problems = []
    for key, rule in rules.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not rule.ok(value):
            problems.append(f"{key}={value!r}: must be {rule.what}")
    return problems


def known_keys(group: str) -> set[str]:
    """Every key that ``conf/GROUP/*.yaml`` (and the experiment presets, for that group) define, dotted, with the
    keys holding them (``prompt`` for ``prompt.kind``)."""
    leaves: set[str] = set()
    for path in (CONF / group).glob("*.yaml"):
        leaves |= _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=False)).keys()
    for path in (CONF / "experiment").glob("*.yaml"):
        preset = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        leaves |= _flat(preset.get(group) if isinstance(preset, dict) else None).keys()
    return {".".join(leaf.split(".")[:n]) for leaf in leaves for n in range(1, leaf.count(".") + 2)} - {"defaults"}


def unknown_key_problems(cfg: DictConfig) -> list[str]:
    """Keys added with ``+group.key=...`` that no YAML of the group defines, and ``+trainer.*`` keys that are not
    ``Seq2SeqTrainingArguments`` fields (transformers, a second to import, only for keys no trainer YAML has)."""
    problems = []
    for group in CLOSED_GROUPS:
        if group not in cfg:
            continue
        known = known_keys(group)
        for key in sorted(_flat(OmegaConf.to_container(cfg[group], resolve=False)).keys() - known):
            problems.append(f"{group}.{key}: unknown key; the {group} group takes {', '.join(sorted(known))}")
    extra = set(cfg.trainer) - known_keys("trainer") if "trainer" in cfg else set()
    if extra:
        from transformers import Seq2SeqTrainingArguments

        fields = {field.name for field in dataclasses.fields(Seq2SeqTrainingArguments)}
        for key in sorted(extra - fields):
            problems.append(f"trainer.{key}: not a Seq2SeqTrainingArguments field; check its spelling")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        listed = "\n".join(f"  {line}" for line in problems)
        raise ConfigError(f"{len(problems)} bad setting(s); fix them on the command line:\n{listed}")


def prefix_init_problems(cfg: DictConfig) -> list[str]:
    """``prefix.init=text|vocab`` writes keys/values into the table: not with a projection (its input is no key or
    value), not with ``init_from`` (two starts), and ``text`` needs its text."""
    init = OmegaConf.select(cfg, "prefix.init", default="random")
    if init not in ("text", "vocab"):
        return []
    problems = []
    if OmegaConf.select(cfg, "prefix.projection", default=False):
        problems.append(f"prefix.init={init}: needs prefix.projection=false (the projection's input is no key/value)")
    if cfg.get("init_from"):
        problems.append(f"prefix.init={init} and init_from both set the starting prefix; drop one")
    if init == "text" and not OmegaConf.select(cfg, "prefix.init_text", default=None):
        problems.append("prefix.init=text: set prefix.init_text to a string, or @path to a UTF-8 file")
    return problems


def check_train_config(cfg: DictConfig) -> None:
    """train.py's config: top-level knobs of the right type, no unknown key in a group, a prefix start that fits."""
    problems = type_problems(cfg, TRAIN_RULES) + unknown_key_problems(cfg)
    _raise(problems or prefix_init_problems(cfg))


def check_train_paths(cfg: DictConfig) -> None:
    """train.py's model folder and data files are there: named at once, before torch loads (~5 s), not when
    the loader reaches them. Apart from ``check_train_config``, which also checks configs whose paths are made up
    (the composed-config tests)."""
    check_model_dir(cfg.model.path)
    for split in (cfg.dataset.train_file, cfg.dataset.validation_file):
        if (problem := file_problem(split_path(cfg.dataset.dir, split))) is not None:
            raise problem


def check_frontend_config(cfg: DictConfig) -> None:
    """chat.yaml as composed for ptune chat / web / serve: values of the right type, no key it does not define
    (``+generation.max_new_token=5`` would otherwise reach the generation settings as an unknown argument)."""
    _raise(type_problems(cfg, FRONTEND_RULES) + added_key_problems(cfg, "chat"))


def check_evaluate_config(cfg: DictConfig) -> None:
    """evaluate.yaml as composed: ``max_samples=abc`` named here, not as a ``TypeError`` deep in the evaluator;
    exactly one of ``checkpoint=`` and ``predictions=``."""
    _raise(type_problems(cfg, EVALUATE_RULES))
    if bool(cfg.checkpoint) == bool(cfg.predictions):
        raise ConfigError("give exactly one of checkpoint=PATH or predictions=PATH (see --help)")


# -- a key that the config does not have -----------------------------------------------------------------------


def _group_options(config_name: str) -> list[str]:
    """The config groups ``conf/CONFIG.yaml`` composes under a key of their own (not ``@package _global_`` ones)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / f"{config_name}.yaml")).get("defaults", [])
    groups = [next(iter(entry)) for entry in defaults if isinstance(entry, dict)]
    return [
        group
        for group in groups
        if (CONF / group).is_dir()
        and not any("@package _global_" in p.read_text(encoding="utf-8") for p in (CONF / group).glob("*.yaml"))
    ]


def defined_keys(config_name: str) -> set[str]:
    """Every dotted key ``conf/CONFIG.yaml`` and its config groups define (``model``, ``model.prompt``,
    ``model.prompt.kind``, ...)."""
    own = _flat(OmegaConf.to_container(OmegaConf.load(CONF / f"{config_name}.yaml"), resolve=False))
    keys = {".".join(k.split(".")[:n]) for k in own for n in range(1, k.count(".") + 2)} - {"defaults", "hydra"}
    keys = {k for k in keys if not k.startswith(("defaults.", "hydra."))}
    for group in _group_options(config_name):
        keys |= {group} | {f"{group}.{key}" for key in known_keys(group)}
    return keys


def key_problem(full_key: str, config_name: str) -> str:
    """``full_key`` is not a key of the config: the keys its parent takes, the closest first."""
    parent, _, name = full_key.rpartition(".")
    siblings = sorted(key.rpartition(".")[2] for key in defined_keys(config_name) if key.rpartition(".")[0] == parent)
    close = difflib.get_close_matches(name, siblings, n=1)
    closest = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    where = f"the {parent} group" if parent else f"{config_name}.yaml's top level"
    return f"{full_key}: no such key; {closest}{where} takes {', '.join(siblings)}"


def override_problem(err: BaseException, config_name: str) -> str:
    """A Hydra composition error in one line; an override of a key that does not exist (``prefix.lenght=8``,
    Hydra's "not in struct") with the keys that do and the closest."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full_key and "not in struct" in str(cause):
        return key_problem(full_key, config_name)
    return " ".join(str(err).split())


def added_key_problems(cfg: DictConfig, config_name: str) -> list[str]:
    """Keys added with ``+key=...`` that ``conf/CONFIG.yaml`` does not define."""
    defined = defined_keys(config_name)
    added = _flat(OmegaConf.to_container(cfg, resolve=False)).keys() - defined - {"hydra"}
    return [key_problem(key, config_name) for key in sorted(added) if not key.startswith("hydra.")]


# -- a checkpoint against the base model and the settings it is used with ---------------------------------------


MAX_SHOWN = 12  # differing base-config keys named in the message


def base_config_problem(meta: dict[str, Any], base_path: str | Path) -> str | None:
    """How the model ``base_path`` loads to differs from the one the checkpoint was trained on (None: it does not).

    Compared as loaded (:func:`ptune.model.base.effective_config`): an original ChatGLM2 folder and its
    ``ptune convert`` output are one base, while any value that changes the model (``rope_theta``, a layer count,
    a saved quantization) still differs. A config transformers does not know is compared as written."""
    # imported here: the config checks above run in the HTTP process of ``ptune serve``, which never imports torch
    from ptune.model.base import config_sha256, effective_config

    recorded = meta["base_model"]
    if config_sha256(base_path) == recorded["config_sha256"]:
        return None
    if "config" not in recorded:
        return "the checkpoint records only its hash (an older checkpoint), so which keys differ is not known"
    written = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))
    trained, current = effective_config(recorded["config"]), effective_config(written)
    if trained is None or current is None:
        trained, current = recorded["config"], written
    trained, current = _flat(trained), _flat(current)
    changes = [
        f"{key}: {_shown(trained, key)} in the checkpoint's, {_shown(current, key)} here"
        for key in sorted(trained.keys() | current.keys())
        if trained.get(key, _ABSENT) != current.get(key, _ABSENT)
    ]
    if not changes:
        return None  # the same model in another layout or form
    more = f"; and {len(changes) - MAX_SHOWN} more" if len(changes) > MAX_SHOWN else ""
    return "; ".join(changes[:MAX_SHOWN]) + more


def _shown(config: dict[str, Any], key: str) -> str:
    return repr(config[key]) if key in config else "absent"


def check_base_model(checkpoint: str | Path, meta: dict[str, Any], base_path: str | Path, allow: bool) -> None:
    """Refuse a base model whose config.json differs from the one ``checkpoint`` was trained on, naming the keys;
    with ``allow`` (``allow_base_mismatch=true``) only warn."""
    problem = base_config_problem(meta, base_path)
    if problem is None:
        return
    message = (
        f"{checkpoint} was trained on a base model whose config.json differs from {Path(base_path) / 'config.json'}: "
        f"{problem}. Point model.path at the base it was trained on (recorded: {meta['base_model']['path']}), or set "
        "allow_base_mismatch=true to use this one on purpose."
    )
    if not allow:
        raise ConfigError(message)
    logger.warning("allow_base_mismatch=true: %s", message)


#: Settings that may change on resume: where and how often things are written, logged and evaluated, threads.
#: Everything else shapes the run (schedule, optimizer, data, prefix), which resuming continues as it was.
RESUME_FREE = frozenset(
    {
        "resume",
        "init_from",  # the starting weights, which resuming replaces by the checkpoint's
        "prefix.init",  # likewise: a resume is never initialised
        "prefix.init_text",
        "save_steps",
        "max_eval_samples",
        "torch_threads",
        "allow_base_mismatch",
        "model.path",  # a moved base: check_base_model compares its config instead
        "dataset.dir",
        "dataset.cache_dir",
        "dataset.validation_file",
        "dataset.pad_to_multiple_of",
        "trainer.save_steps",
        "trainer.eval_steps",
        "trainer.logging_steps",
        "trainer.report_to",
        "trainer.save_total_limit",
        "trainer.per_device_eval_batch_size",
        "trainer.dataloader_num_workers",
        "trainer.dataloader_pin_memory",
        "trainer.torch_compile",
        "trainer.activation_checkpointing",
    }
)


def _override(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def settings_changes(trained: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key: (checkpoint's value, this run's value)`` for settings that shape the run and differ; keys only one
    side has (added or dropped by another ptune version) are not compared."""
    before, after = _flat(trained), _flat(now)
    changes = {
        key: (before[key], after[key])
        for key in sorted(before.keys() & after.keys())
        if key not in RESUME_FREE and before[key] != after[key]
    }
    # trainer.max_steps etc. follow the top-level knob: name the knob only
    return {
        key: change
        for key, change in changes.items()
        if not (key.startswith("trainer.") and changes.get(key.removeprefix("trainer.")) == change)
    }


def check_resume_settings(checkpoint: str | Path, meta: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse to resume with settings that shape the run changed: the schedule, optimizer state and data order
    continue from the checkpoint, so they would not take effect as written, and the new checkpoints would record
    values the run was not trained with."""
    changes = settings_changes(meta["config"], OmegaConf.to_container(cfg, resolve=True))
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    same = " ".join(f"{key}={_override(old)}" for key, (old, _new) in changes.items())
    raise ConfigError(
        f"resume={cfg.resume}: {checkpoint} was trained with other settings: {listed}. Resuming continues its "
        "learning-rate schedule, optimizer state and data order, so these would not take effect as set. Resume "
        f"with the checkpoint's values ({same}), or start a new schedule from its prefix weights in a new run "
        f"folder: resume=null init_from={checkpoint}"
    )
