"""Typed experiment configuration: defaults → preset YAML → CLI dotlist, validated, then frozen.

Every preset in ``experiments/configs/`` and every ``key=value`` override is merged onto the
schema (``orchestrator/schema.py``) -- a misspelt key fails with its full dotted name, a value of
the wrong type names its key -- and then checked (``orchestrator/checks.py``): the method's
options against its typed options class, the protocol's rules, names, and every point of the
search space. :func:`resolve_paths` makes every path-valued field absolute before Ray changes the
working directory; :func:`trial_config` rebuilds a trial's config from what Tune hands it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from vlprompt.methods import METHODS, get_method, method_option_names
from vlprompt.methods.pretrained import is_checkpoint_path
from vlprompt.orchestrator.checks import method_options, project_method, validate
from vlprompt.orchestrator.schema import (
    SECTIONS,
    ConfigError,
    ExperimentConfig,
    flatten,
    param_value,
    structured,
)
from vlprompt.orchestrator.search_space import condition_holds, grid_points

__all__ = [
    "PRESET_DIR",
    "ConfigError",
    "ExperimentConfig",
    "config_from_params",
    "flatten",
    "load_config",
    "method_options",
    "project_method",
    "resolve_paths",
    "tracking_uri",
    "trial_config",
    "validate",
]

PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"
SPACE_ROOTS = ("model", "data", "method", "train", "seed")
#: Search spaces with more points than this are checked one value at a time, not point by point.
MAX_CHECKED_POINTS = 5000


def preset_path(name_or_path: str) -> Path:
    """A preset name (``quickstart``) or a YAML path → the file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; presets in {PRESET_DIR}: {', '.join(known)}")
    return candidate


def load_config(preset: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge defaults → preset → dotlist overrides and validate; returns a read-only config."""
    cfg = OmegaConf.structured(ExperimentConfig)
    layers: list[tuple[str, Any]] = []
    if preset is not None:
        path = preset_path(preset)
        layers.append((str(path), _read_yaml(path)))
    if overrides:
        layers.append(("command line", _read_overrides(overrides)))
    for origin, layer in layers:
        cfg = _merge(cfg, layer, origin)
        if origin == "command line":
            _pin_axes(cfg, layer)
    validate(cfg)
    check_space(cfg)
    if overrides:
        _refuse_ignored(cfg, layers[-1][1])
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}; fix the file and retry") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: a preset is a mapping of sections (model:, data:, ...), not a list")
    return layer


def _read_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like section.key=value, got {bad}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(
            f"command line: cannot parse the overrides {list(overrides)}: {_first_line(err)}"
        ) from None


def _merge(cfg: DictConfig, layer: Any, origin: str) -> DictConfig:
    # The method section is replaced key by key; if the layer switches the method name,
    # keys only the previous method knew would be wrong, so they are dropped first.
    section = layer.get("method")
    layer_method = OmegaConf.to_container(section, resolve=False) if OmegaConf.is_config(section) else {}
    if "name" in layer_method and layer_method["name"] != cfg.method.get("name"):
        cfg.method = {"name": layer_method["name"]}
    # A layer that gives sweep.space replaces the whole space: merging would keep axes of
    # the preset that the user meant to drop (``sweep.space={}`` must mean "no sweep").
    sweep = layer.get("sweep")
    if OmegaConf.is_config(sweep) and "space" in sweep:
        cfg.sweep.space = {}
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(f"{origin}: unknown config key {key!r} ({_first_line(err)})") from None
    except ValidationError as err:
        raise ConfigError(f"{origin}: bad value for {err.full_key!r}: {_first_line(err)}") from None
    except TypeError as err:  # e.g. a list where the defaults have a mapping
        raise ConfigError(
            f"{origin}: {_first_line(err)} (check the shape of every key this layer sets)"
        ) from None


def _pin_axes(cfg: DictConfig, layer: DictConfig) -> None:
    """A command-line ``key=value`` for a key the preset's ``sweep.space`` sweeps pins that axis.

    ``--config quickstart data.shots=4`` means "4 shots", not "the preset's shots axis with my
    value silently replaced". The axis goes; axes conditioned on it keep the condition's verdict
    for the pinned value (their ``when`` on it is dropped, or the axis itself when it fails). A
    command line that sets ``sweep.space`` itself is taken as it is.
    """
    sweep = layer.get("sweep")
    if OmegaConf.is_config(sweep) and "space" in sweep:
        return
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) or {}
    pinned = {key: OmegaConf.select(cfg, key) for key in flatten(layer) if key in space}
    if not pinned:
        return
    kept = {}
    for key, spec in space.items():
        if key in pinned:
            continue
        when = dict(spec.get("when") or {})
        holds = [condition_holds(when.pop(k), pinned[k]) for k in list(when) if k in pinned]
        if all(holds):
            kept[key] = {**spec, "when": when} if when else {k: v for k, v in spec.items() if k != "when"}
    cfg.sweep.space = kept
    shown = ", ".join(f"{k}={v}" for k, v in pinned.items())
    print(f"[vlprompt] {shown} from the command line: that sweep.space axis is fixed", file=sys.stderr)


def _refuse_ignored(cfg: DictConfig, layer: DictConfig) -> None:
    """A command-line ``method.<option>`` that another option overrides with another value is
    refused by name.

    ``--config quickstart method.n_ctx=8`` would otherwise run CoOp with the 4 tokens of its
    preset's ``ctx_init`` and say nothing. Each method declares the relation (``IGNORED_WITH`` of
    its options class: ``n_ctx`` is ignored when ``ctx_init`` is set); every method the config may
    run is checked (the one named, and the ``method.name`` axis of the space). The words of
    ``ctx_init`` stand for its tokens (the tokenizer needs torch, which the driver does not load):
    a value equal to them is no conflict."""
    given = OmegaConf.to_container(layer.method, resolve=True) if "method" in layer else {}
    section = OmegaConf.to_container(cfg.method, resolve=True)
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) or {}
    names = {cfg.method.get("name"), *((space.get("method.name") or {}).get("choice") or [])}
    for name in sorted(n for n in names if n in METHODS):  # an unknown name: validate() says so
        options = get_method(name).options
        effective = {**_defaults(options), **project_method(section, name)}
        for option, by in getattr(options, "IGNORED_WITH", {}).items():
            words = str(effective.get(by) or "").replace("_", " ").split()
            if option in given and words and given[option] != len(words):
                raise ConfigError(
                    f"command line: method.{option}={given[option]} has no effect on {name}: "
                    f"method.{by}={effective[by]!r} sets it ({len(words)} tokens); add "
                    f"\"method.{by}=''\" for {given[option]} randomly initialised tokens, or change "
                    f"method.{by}"
                )


def _defaults(options: type) -> dict[str, Any]:
    """An options dataclass's default values, by field."""
    return {f.name: f.default for f in dataclasses.fields(options) if f.default is not dataclasses.MISSING}


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# ------------------------------------------------------------------------------ trials and the space


def trial_config(config: Mapping[str, Any]) -> DictConfig:
    """Tune's merged trial config (preset + the searcher's point) → validated experiment config."""
    plain = {k: v for k, v in config.items() if not k.startswith("_")}
    method = dict(plain.get("method") or {})
    try:
        plain["method"] = project_method(method, method.get("name", ""))
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None
    try:
        cfg = OmegaConf.merge(structured(ExperimentConfig), plain)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad value for {getattr(err, 'full_key', '?')!r}: {_first_line(err)}") from None
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


#: The sections of a finished run's config that :func:`config_from_params` reads back: what its
#: model, data, method and numbers were. Resources, tracking and the sweep said how it ran.
REBUILT_SECTIONS = ("model", "data", "train")
#: Longer param values were cut when logged (``tracking._param_value``).
PARAM_LIMIT = 6000


def config_from_params(params: Mapping[str, str], overrides: Sequence[str] = ()) -> DictConfig:
    """A finished run's config from its MLflow params (``loop.log_run`` logs ``flatten(cfg)``),
    validated like a trial's, then ``section.key=value`` ``overrides`` on top (a data root that
    moved, ``train.device=cpu``).

    Read back: ``name``, ``seed``, the ``model``/``data``/``train`` fields and the method section;
    other params (counts, fingerprints, code version) are not config. A value cut at
    :data:`PARAM_LIMIT` characters when logged is a ``ConfigError`` naming the key, unless an
    override gives it.
    """
    given = {o.split("=", 1)[0].strip() for o in overrides}
    plain: dict[str, Any] = {}
    for key, text in sorted(params.items()):
        if not _rebuilt(key):
            continue
        if len(text) >= PARAM_LIMIT and key not in given:
            raise ConfigError(
                f"param {key!r} was cut at {PARAM_LIMIT} characters when the run logged it; "
                f"give its value as an override {key}=..."
            )
        *parents, leaf = key.split(".")
        node = plain
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = param_value(text)
    if not plain.get("method", {}).get("name"):
        raise ConfigError("the run logged no method.name param: not a run of vlprompt's loop (loop.log_run)")
    cfg = trial_config(plain)
    if overrides:
        cfg = _merge(cfg, _read_overrides(overrides), "command line")
        validate(cfg)
    return cfg


def _rebuilt(key: str) -> bool:
    section, _, field = key.partition(".")
    if section in ("name", "seed"):
        return not field
    if section == "method":
        return bool(field)
    if section in REBUILT_SECTIONS:
        return field in {f.name for f in dataclasses.fields(SECTIONS[section])}
    return False


def apply_point(plain: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the plain config with a search-space point's ``section.key`` values set in it."""
    out = copy.deepcopy(dict(plain))
    for key, value in point.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def check_space(cfg: DictConfig) -> None:
    """The space's shape, then every point of it as the trial that would run it (or, for a huge
    space, every value of every key): a bad key or value is an error now, not in a trial."""
    for _ in space_trials(cfg):
        pass


def space_trials(cfg: DictConfig) -> Iterator[DictConfig]:
    """The validated config of every trial the search space can make (the config itself when the
    space is empty); ``ConfigError`` naming the point that is wrong."""
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) or {}
    for key, spec in space.items():
        _check_axis(cfg, space, key, spec)
    if not space:
        yield cfg
        return
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["sweep"]["space"] = {}
    sizes = [len(spec["choice"]) for spec in space.values()]
    if math.prod(sizes) <= MAX_CHECKED_POINTS:
        points = grid_points(space)
    else:
        points = [{key: value} for key, spec in space.items() for value in spec["choice"]]
    for point in points:
        try:
            trial = apply_point(plain, point)
            _check_method_keys(point, trial["method"].get("name"))
            checked = trial_config(trial)
        except ConfigError as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"sweep.space point {{{shown}}}: {err}") from None
        yield checked


def _check_axis(cfg: DictConfig, space: Mapping[str, Any], key: str, spec: Any) -> None:
    root = key.split(".")[0]
    if root not in SPACE_ROOTS:
        raise ConfigError(f"sweep.space key {key!r} must start with one of {sorted(SPACE_ROOTS)}")
    if root not in ("method", "seed") and OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
        raise ConfigError(f"sweep.space key {key!r} is not a config key")
    if not isinstance(spec, dict) or "choice" not in spec or not isinstance(spec["choice"], list):
        raise ConfigError(
            f"sweep.space.{key} must be {{choice: [values...]}} (optional when: {{key: value}})"
        )
    if not spec["choice"]:
        raise ConfigError(f"sweep.space.{key}.choice is empty")
    extra = set(spec) - {"choice", "when"}
    if extra:
        raise ConfigError(f"sweep.space.{key} has unknown fields {sorted(extra)} (allowed: choice, when)")
    for cond_key in spec.get("when") or {}:
        if cond_key not in space:
            raise ConfigError(f"sweep.space.{key}.when refers to {cond_key!r}, which is not in sweep.space")


def _check_method_keys(point: Mapping[str, Any], method: str | None) -> None:
    """A ``method.<option>`` the space sets must be an option of the point's method (a trial
    would drop it silently otherwise)."""
    try:
        valid = method_option_names(method or "")
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None
    for key in point:
        option = key.removeprefix("method.")
        if key.startswith("method.") and option != "name" and option not in valid:
            raise ConfigError(
                f"{key} is not an option of method {method!r} (its options: {', '.join(valid)}); "
                "if it belongs to another method of the sweep, add when: {method.name: [...]} to it"
            )


# ------------------------------------------------------------------------------ paths


def resolve_paths(cfg: DictConfig, base: Path | None = None) -> DictConfig:
    """Make every path absolute against the launch directory before it crosses into Ray.

    Ray Tune and Train change the working directory of trials and workers; a relative
    ``data.root``, ``model.pretrained=weights.ckpt`` or ``sqlite:///mlflow.db`` would then point
    somewhere else. Path-valued fields are found by their ``path`` metadata, in the schema and in
    the method's options (nested method options too).
    """
    base = (base or Path.cwd()).resolve()
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for section, schema in SECTIONS.items():
        _resolve_fields(cfg[section], schema, base)
    _resolve_method(cfg.method, get_method(cfg.method.name).options, base)
    cfg.tracking.uri = tracking_uri(cfg.tracking.uri, base)
    cfg.sweep.name = cfg.sweep.name or cfg.name
    return cfg


def _absolute(kind: str, value: str, base: Path) -> str:
    if kind == "weights" and not is_checkpoint_path(value):
        return value  # an open_clip tag ("openai") or "bundled"
    return str((base / os.path.expanduser(value)).resolve())


def _resolve_fields(node: DictConfig, schema: type, base: Path) -> None:
    for f in dataclasses.fields(schema):
        kind = f.metadata.get("path")
        if kind and node.get(f.name):
            node[f.name] = _absolute(kind, node[f.name], base)


def _resolve_method(node: DictConfig, options_class: type, base: Path) -> None:
    """The method's path options, and those of a method it holds (PromptKD's teacher options)."""
    _resolve_fields(node, options_class, base)
    defaults = {f.name: f.default for f in dataclasses.fields(options_class)}
    for f in dataclasses.fields(options_class):
        of, nested = f.metadata.get("options_of"), node.get(f.name)
        if of and nested:
            _resolve_method(nested, get_method(node.get(of, defaults[of])).options, base)


def tracking_uri(configured: str | None, base: Path) -> str:
    """config → $MLFLOW_TRACKING_URI → ``sqlite:///<launch dir>/mlflow.db``, always absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((base / uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare folder or file path
        uri = "sqlite:///" + str((base / uri).resolve())
    return uri
