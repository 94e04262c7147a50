"""One Config dataclass: every CLI flag is a field (--local-steps <-> local_steps), a YAML/JSON file may set them."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A bad setting, reported as one line before any training starts."""


def _f(default, help: str, group: str, choices: Optional[Sequence[str]] = None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


STRATEGY_NAMES = ("resist", "local_sgd", "data_parallel")


@dataclass
class Config:
    # -- what to train ---------------------------------------------------------------------------
    strategy: str = _f("resist", "training strategy", "model", STRATEGY_NAMES)
    model: str = _f("preact_resnet101", "registered model name (see --list-models)", "model")
    width: int = _f(64, "channels of the first stage of the preact_resnet models (64 in the paper; 8/16 for thin CPU "
                        "models; torchvision's models have their own)", "model")
    partition_stages: str = _f("3", "1-based stages whose non-strided blocks are partitioned, e.g. '3' or '2,3'", "model")
    # -- data ------------------------------------------------------------------------------------
    dataset: str = _f("digits", "digits (embedded), synthetic, cifar10, cifar100, imagefolder, hdf5", "data")
    data_dir: Optional[str] = _f(None, "dataset directory (or the .h5 file for hdf5)", "data")
    download: bool = _f(False, "download CIFAR when absent (needs network)", "data")
    workers: int = _f(0, "DataLoader worker processes per rank", "data")
    image_size: Optional[int] = _f(None, "imagefolder: crop size fed to the model (none: 224)", "data")
    # -- optimisation --------------------------------------------------------------------------------
    epochs: int = _f(160, "training epochs", "optim")
    batch_size: int = _f(128, "mini-batch size per rank", "optim")
    lr: float = _f(0.1, "initial learning rate", "optim")
    momentum: float = _f(0.9, "SGD momentum", "optim")
    weight_decay: float = _f(5e-4, "SGD weight decay", "optim")
    schedule: str = _f("step", "step (/10 at 50%% and 75%% of epochs) or cosine", "optim", ("step", "cosine"))
    local_steps: int = _f(50, "SGD steps per round between synchronisations (l)", "optim")
    min_depth: int = _f(0, "minimum blocks per sub-ResNet (blocks overlap when needed); 0: none", "optim")
    group_size: str = _f("1", "ranks per group: ResIST (or local SGD) between groups, data-parallel inside each; "
                         "a number, or 'node' (the ranks of one node); 1: the paper's ResIST", "optim")
    wire_dtype: str = _f("float32", "what averages move as: the model averages' round updates with error feedback, "
                         "data-parallel's gradients; blocks that move stay float32", "optim",
                         ("float32", "float16", "bfloat16", "int8"))
    optimizer_state: str = _f("auto", "the optimizer's state at a round boundary: reset (the paper's fresh optimizer), "
                              "keep_shared (the shared layers' momentum survives), keep (all of it; a block that "
                              "arrives from another rank starts fresh); auto: reset, keep for data_parallel", "optim",
                              ("auto", "reset", "keep_shared", "keep"))
    overlap: bool = _f(False, "average the shared layers (local SGD: the model) in the background while the next "
                       "round trains, applied --overlap-steps into it (blocks still move at the round boundary)",
                       "optim")
    overlap_steps: Optional[int] = _f(None, "with --overlap: the average in flight lands after this many local steps "
                                      "of the next round (0: at its end); a shorter delay costs less accuracy and has "
                                      "less time to hide in; default: half of --local-steps", "optim")
    outer_optimizer: str = _f("average", "what a round's averaged update does: average (the plain mean), nesterov "
                              "(an outer Nesterov step on it, as DiLoCo)", "optim", ("average", "nesterov"))
    mpi_progress: str = _f("thread", "who moves an overlapped average's bytes under the mpi backend: thread (the "
                           "background thread) or poll (the training thread, after every optimizer step)", "optim",
                           ("thread", "poll"))
    outer_lr: float = _f(0.7, "outer step size (--outer-optimizer nesterov; DiLoCo's 0.7)", "optim")
    outer_momentum: float = _f(0.9, "outer momentum (--outer-optimizer nesterov; DiLoCo's 0.9)", "optim")
    warmup_epochs: int = _f(0, "epochs of local SGD before ResIST takes over (the paper's ImageNet recipe)", "optim")
    # -- evaluation --------------------------------------------------------------------------------------
    eval_every: int = _f(1, "evaluate every N epochs (0: only at the end)", "eval")
    eval_background: Optional[bool] = _f(None, "evaluate on the background thread while the next round trains (the "
                                         "same model and result; logged a round later); the final evaluation runs "
                                         "as usual; default: on where the ranks span more than one node", "eval")
    eval_bn: str = _f("recalibrate", "BN statistics for the full model at test time: recalibrate (re-estimated "
                      "from the first partitioned block on), recalibrate_all (every BN layer), running "
                      "(the averaged running statistics), batch (each test batch's)", "eval",
                      ("recalibrate", "recalibrate_all", "running", "batch"))
    bn_images: int = _f(0, "training images, all ranks together, that re-estimate BN statistics for the full "
                        "model (at most one pass of the training set); 0: 128 when only the layers from ResIST's "
                        "first partitioned block are re-estimated, 256 when every layer is (benchmarks/eval_bench.py)",
                        "eval")
    bn_batches: int = _f(0, "training batches per rank for the BN re-estimate instead of --bn-images (0: from "
                         "--bn-images)", "eval")
    # -- run ---------------------------------------------------------------------------------------------
    seed: int = _f(0, "random seed (model init, data order, partitions)", "run")
    out: str = _f("runs/resist", "output directory (metrics.jsonl, config.json, checkpoints)", "run")
    backend: str = _f("auto", "communication backend (auto: torch under torchrun, with NCCL on GPUs and under "
                      "horovodrun --gloo; else mpi; horovod only by name)",
                      "run", ("auto", "mpi", "horovod", "torch", "self"))
    device: str = _f("auto", "auto, cpu, cuda (one GPU per local rank) or cuda:N", "run")
    checkpoint_every: int = _f(0, "write a checkpoint every N epochs (0: off)", "run")
    checkpoint_minutes: float = _f(0.0, "also write a checkpoint every M minutes (0: off)", "run")
    checkpoint_rounds: int = _f(0, "also write a checkpoint every N rounds (1: every round; sharded and in the "
                                "background, so it costs little: a lost node then costs at most a round)", "run")
    keep_checkpoints: int = _f(2, "how many recent complete checkpoints to keep", "run")
    resume: Optional[str] = _f(None, "checkpoint path, or 'auto' for the newest in --out", "run")
    overwrite: bool = _f(False, "start afresh in an --out that holds a run (its records and checkpoints are deleted)", "run")
    lock_wait: float = _f(0.0, "seconds to wait for --out's lock while another process holds it, before refusing "
                                "(the job scripts pass 180 after a lost node: NFS keeps a dead node's lock until "
                                "its lease ends)", "run")
    comm_timeout: float = _f(300.0, "seconds without progress before peers are probed; an unreachable one "
                             "(lost node or link) aborts the job with one line (0: never)", "run")
    progress: str = _f("auto", "progress bar on rank 0: auto (when a terminal), on, off", "run", ("auto", "on", "off"))
    tensorboard: bool = _f(False, "also log to TensorBoard under OUT/tb", "run")

    def stages(self) -> List[int]:
        """partition_stages as a list of 1-based stage numbers."""
        try:
            stages = [int(s) for s in str(self.partition_stages).split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--partition-stages {self.partition_stages!r}: expected stage numbers like '3' or '2,3'")
        if not stages or min(stages) < 1:
            raise ConfigError(f"--partition-stages {self.partition_stages!r}: stages are numbered from 1")
        return stages

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def field_types() -> Dict[str, Tuple[Any, bool]]:
    """Each Config field's type without Optional, and whether None is allowed: read from the
    dataclass's annotations, the one definition that the flags and the config-file check share."""
    out = {}
    for name, tp in typing.get_type_hints(Config).items():
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) is typing.Union and type(None) in args
        if optional:
            rest = [a for a in args if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        out[name] = (tp, optional)
    return out


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(tp: Any, optional: bool = False, choices: Optional[Sequence[str]] = None) -> str:
    if choices:
        what = "one of " + ", ".join(choices)
    else:
        what = _KIND.get(tp, getattr(tp, "__name__", str(tp)))
    return what + (" or null" if optional else "")


def _shown(value: Any) -> str:
    """A value as the file wrote it (YAML and JSON spell None, True as null, true)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def coerce_setting(key: str, value: Any, tp: Any, optional: bool = False,
                   choices: Optional[Sequence[str]] = None) -> Any:
    """A config file's value for a field of type tp, or ConfigError naming the key, the value and
    what it must be. A file's values are YAML/JSON types, not text: a bool only from a boolean (the
    string 'false' is refused, not read as true); an int from an integer, or from a string the flag
    would read ('5'), never from a boolean or a float (3.0 too); a float from a number or such a
    string (PyYAML reads 1e-3 as a string); a string from a string, or an integer written as it
    (group_size: 2 is '2', as --group-size 2), or a boolean where on and off are the choices (YAML
    reads an unquoted off as false); never a list or a mapping; null only where the field is
    Optional; and a field with choices takes one of them."""
    given = value  # as the file wrote it, for the message

    def bad() -> ConfigError:
        hint = (" (a boolean, unquoted)" if tp is bool and isinstance(given, str) else
                " (written without a decimal point)" if tp is int and isinstance(given, float) else "")
        return ConfigError(f"{key} {_shown(given)} must be {_describe(tp, optional, choices)}{hint}")
    if value is None:
        if optional:
            return None
        raise bad()
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
    elif tp is str and isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
        value = "on" if value else "off"  # YAML 1.1 reads `progress: off` as false
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad()  # a boolean, list or mapping where a number or a string belongs
    elif tp is int:
        if isinstance(value, float):
            raise bad()
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad() from None
    elif tp is float:
        try:
            value = float(value)
        except ValueError:
            raise bad() from None
    elif tp is str:
        if isinstance(value, float):
            raise bad()
        value = str(value)
    if choices and value not in choices:
        raise bad()
    return value


def check_file_values(path: str, settings: Dict[str, Any], keys: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """A config file's settings (Config field names) checked against the fields' types; keys: the
    file's own spelling of each name, for the message."""
    types, out = field_types(), {}
    by_name = {f.name: f for f in fields(Config)}
    for name, value in settings.items():
        tp, optional = types[name]
        try:
            out[name] = coerce_setting((keys or {}).get(name, name), value, tp, optional,
                                       by_name[name].metadata.get("choices"))
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    return out


def validate(cfg: Config) -> Config:
    """Check settings that need no model or data; raise ConfigError with one line."""
    from ..models import list_models
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r}: choose one of {', '.join(choices)}")
    for name, (tp, _) in field_types().items():  # NaN passes every bound below (nan <= 0 is false)
        value = getattr(cfg, name)
        if tp is float and isinstance(value, (int, float)) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if cfg.model not in list_models():
        raise ConfigError(f"unknown model {cfg.model!r}; available: {', '.join(list_models())}")
    if cfg.model.startswith("torchvision.") and cfg.width != 64:
        raise ConfigError(f"--width {cfg.width}: {cfg.model} has torchvision's own widths (--width applies to the "
                          f"package's preact_resnet models)")
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "local_steps": cfg.local_steps,
                "width": cfg.width, "keep_checkpoints": cfg.keep_checkpoints}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    non_negative = {"min_depth": cfg.min_depth, "warmup_epochs": cfg.warmup_epochs, "eval_every": cfg.eval_every,
                    "workers": cfg.workers, "checkpoint_every": cfg.checkpoint_every, "bn_batches": cfg.bn_batches,
                    "bn_images": cfg.bn_images,
                    "checkpoint_minutes": cfg.checkpoint_minutes,
                    "checkpoint_rounds": cfg.checkpoint_rounds, "weight_decay": cfg.weight_decay,
                    "momentum": cfg.momentum, "comm_timeout": cfg.comm_timeout, "lock_wait": cfg.lock_wait}
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if cfg.momentum >= 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not -2 ** 63 <= cfg.seed < 2 ** 63:  # torch.manual_seed takes a 64-bit integer
        raise ConfigError(f"--seed must fit in 64 bits, got {cfg.seed}")
    if cfg.outer_lr <= 0 or not 0 <= cfg.outer_momentum < 1:
        raise ConfigError(f"--outer-lr must be positive and --outer-momentum in [0, 1), got {cfg.outer_lr} and "
                          f"{cfg.outer_momentum}")
    if cfg.strategy == "data_parallel" and (cfg.overlap or cfg.outer_optimizer != "average"):
        raise ConfigError("--overlap and --outer-optimizer apply to resist and local_sgd (data_parallel averages "
                          "gradients at every step)")
    if (cfg.overlap_steps is not None and not cfg.overlap) or (cfg.overlap_steps and not 0 < cfg.overlap_steps < cfg.local_steps):
        raise ConfigError(f"--overlap-steps {cfg.overlap_steps}: needs --overlap and a value from 1 to --local-steps - 1 "
                          f"({cfg.local_steps - 1}); 0 lands the average at the round's end")
    if cfg.warmup_epochs and cfg.strategy != "resist":
        raise ConfigError("--warmup-epochs applies to --strategy resist only")
    if cfg.warmup_epochs >= cfg.epochs:
        if cfg.warmup_epochs:
            raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs} leaves no ResIST epochs out of {cfg.epochs}")
    if not (str(cfg.group_size) == "node" or (re.fullmatch(r"[0-9]+", str(cfg.group_size)) and int(cfg.group_size) >= 1)):
        raise ConfigError(f"--group-size {cfg.group_size!r}: give a number of ranks per group, or 'node'")
    if str(cfg.group_size) != "1" and cfg.strategy == "data_parallel":
        raise ConfigError("--group-size applies to resist and local_sgd (data_parallel averages over every rank already)")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite starts afresh and --resume continues a run: pass one of them")
    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", str(cfg.device)):
        raise ConfigError(f"--device {cfg.device!r}: use auto, cpu, cuda (one GPU per local rank) or cuda:N")
    if cfg.tensorboard:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard")
    cfg.stages()
    # ~ in a path: the shell expands it on the command line, a config file's value nobody did
    # (`out: ~/runs/x` made a folder named "~" in the working directory)
    for name in ("out", "data_dir", "resume"):
        value = getattr(cfg, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(cfg, name, os.path.expanduser(value))
    return cfg


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one without a word)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep)
    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=_Loader)


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML or JSON config whose keys are Config fields (dashes or underscores)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not UTF-8 text
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            data = _load_yaml(text)
    except Exception as e:  # yaml/json errors are multi-line; keep the first line
        raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}")
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    known = {f.name for f in fields(Config)}
    clean = {str(k).replace("-", "_"): v for k, v in data.items()}
    if len(clean) < len(data):  # local-steps and local_steps: one would win unsaid
        spelled: Dict[str, List[str]] = {}
        for k in data:
            spelled.setdefault(str(k).replace("-", "_"), []).append(str(k))
        twice = next(v for v in spelled.values() if len(v) > 1)
        raise ConfigError(f"config file {path} sets {twice[0]} twice ({' and '.join(twice)}): keep one")
    unknown = sorted(set(clean) - known)
    if unknown:
        hints = "".join(f" ({k} is now {RENAMED[k]})" for k in unknown if k in RENAMED)
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}{hints}")
    return check_file_values(path, clean, {str(k).replace("-", "_"): str(k) for k in data})


RENAMED = {"--keep-shared-momentum": "--optimizer-state keep_shared", "keep_shared_momentum": "optimizer_state: keep_shared"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised, so every rank exits the same way
        for old, new in RENAMED.items():
            if old.startswith("--") and old in message:
                message += f" ({old} is now {new})"
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one flag per Config field, grouped."""
    parser = _Parser(
        prog="python -m resist_mpi.train",
        description="Train a pre-activation ResNet with ResIST (or a baseline) across MPI ranks.")
    parser.add_argument("--config", help="YAML or JSON file with settings (flags given too override it)")
    parser.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    groups = {g: parser.add_argument_group(g) for g in ("model", "data", "optim", "eval", "run")}
    types = field_types()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kw: Dict[str, Any] = {"dest": f.name, "help": f.metadata["help"] + " (default: %(default)s)"}
        tp, _ = types[f.name]
        if tp is bool:  # Optional[bool]: None is "decided by the run" (its help says how)
            kw["action"] = argparse.BooleanOptionalAction
            if f.default is None:
                kw["help"] = f.metadata["help"]
        else:
            kw["type"] = tp if tp in (int, float) else str
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        groups[f.metadata["group"]].add_argument(flag, default=f.default, **kw)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Config from a config file (if --config) overridden by command-line flags."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config_file(pre.config))
    args = parser.parse_args(argv)
    if args.list_models:
        from ..models import list_models
        print("\n".join(list_models()))
        raise SystemExit(0)
    return Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
