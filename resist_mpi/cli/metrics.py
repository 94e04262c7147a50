"""Run records: JSONL metrics and the resolved config on rank 0, one log line per event, a progress bar.

metrics.jsonl is strict JSON, one object per line: a value that is not finite (a diverged loss) is
written as the string "NaN", "Infinity" or "-Infinity" (what Python's json module would have
written bare, which other JSON readers reject); read_metrics turns those strings back into floats.
Every record carries "time", the Unix time it was written (so runs and restarts line up).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def finite_json(value: Any) -> Any:
    """value with every non-finite float replaced by its JSON-safe string ("NaN", "Infinity", ...)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _restore(rec: Dict) -> Dict:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in rec.items()}


class Timer:
    """Accumulates wall-clock seconds of the phases it wraps: `with timer: ...`."""

    def __init__(self):
        self.total = 0.0
        self._t0 = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t0


class RunLog:
    """Everything a run writes; only rank 0 writes, other ranks are quiet.

    Files in out/: config.json (the resolved Config and world), metrics.jsonl (one JSON record per
    round, evaluation and event), and TensorBoard events under out/tb when asked.
    """

    def __init__(self, out: str, is_root: bool, progress: str = "auto", total_rounds: int = 0,
                 tensorboard: bool = False, resume_round: int = 0, resume_epoch: Optional[float] = None,
                 resumed_as: Optional[Tuple[float, int]] = None):
        self.is_root = is_root
        self.out = out
        self.start = time.perf_counter()
        self._fh = None
        self._bar = None
        self._tb = None
        self.damaged: Optional[str] = None  # a line on the record that could not be read, the file kept aside
        if not is_root:
            return
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "metrics.jsonl")
        kept = []
        if (resume_round or resume_epoch is not None) and os.path.exists(path):
            # a resumed run continues the record: keep what happened before the checkpoint only (by
            # epoch where given: after a world-size change a round is another length and the record
            # holds rounds of two numberings)
            try:
                records = read_metrics(path)
            except ValueError as e:  # a damaged line: the records before it go on, the file is kept aside
                records = read_metrics(path, until_damaged=True)
                aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.copyfile(path, aside)
                self.damaged = f"{e}: the records before it go on, the whole file is kept as {aside}"
            kept = [r for r in records if _before(r, resume_round, resume_epoch, resumed_as)]
        # the kept records replace the file at once (a run killed here leaves the old file or the new)
        with open(path + ".tmp", "w") as fh:
            for rec in kept:
                fh.write(json.dumps(finite_json(rec), allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(path + ".tmp", path)
        self._fh = open(path, "a")
        show = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        if show and total_rounds:
            from tqdm import tqdm
            self._bar = tqdm(total=total_rounds, unit="round", dynamic_ncols=True, leave=False)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # TensorBoard follows metrics.jsonl: events from the first round this run logs on, which
            # an earlier attempt wrote (a resume from an older checkpoint, a run started afresh), are
            # purged from its view instead of showing beside this run's
            self._tb = SummaryWriter(os.path.join(out, "tb"), purge_step=resume_round)

    def wallclock(self) -> float:
        return time.perf_counter() - self.start

    def write_config(self, config: Dict[str, Any]) -> None:
        if self.is_root:
            path = os.path.join(self.out, "config.json")
            with open(path + ".tmp", "w") as fh:
                json.dump(config, fh, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)

    def record(self, event: str, **fields: Any) -> None:
        """Append one JSON record {"event": event, ...} to metrics.jsonl (rank 0)."""
        if not self.is_root:
            return
        rec = finite_json({"event": event, **fields, "time": round(time.time(), 3)})
        self._fh.write(json.dumps(rec, allow_nan=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = fields.get("round", 0)
            for k, v in fields.items():
                if isinstance(v, (int, float)) and k != "round":
                    self._tb.add_scalar(f"{event}/{k}", v, step)
        if self._bar is not None and event == "round":
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{fields.get('train_loss', 0):.3f}", acc=f"{fields.get('train_acc', 0):.3f}")

    def info(self, line: str) -> None:
        """One line for a human, on rank 0."""
        if not self.is_root:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def finished(out: str) -> bool:
    """Whether run directory out holds a finished run: its metrics.jsonl ends with the `done` record
    (the job scripts read it the same way: a launcher's exit 0 alone does not say the run trained)."""
    try:
        with open(os.path.join(out, "metrics.jsonl"), "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    last = next((line for line in reversed(lines) if line.strip()), b"")
    return last.startswith(b'{"event": "done"')


def mark_done(out: str, **fields: Any) -> None:
    """Rank 0 of a run with nothing left to train: the `done` record, unless the record ends with it
    already (a run killed between its last checkpoint and its record gets it here)."""
    if finished(out):
        return
    with open(os.path.join(out, "metrics.jsonl"), "ab+") as fh:
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)  # a last line cut short (no newline: never read) goes
        fh.seek(0, os.SEEK_END)
        rec = finite_json({"event": "done", **fields, "time": round(time.time(), 3)})
        fh.write((json.dumps(rec, allow_nan=False) + "\n").encode())


def _before(rec: Dict, resume_round: int, resume_epoch: Optional[float],
            resumed_as: Optional[Tuple[float, int]] = None) -> bool:
    """Whether a record of the run being resumed stays: it came before the checkpoint's epoch
    (resume_epoch; without one, before resume_round). A resume's own records (resume, membership)
    at resumed_as = (its start epoch, its world size) are an earlier attempt of this resume, redone
    now; earlier changes of the world stay, also one at the same start epoch to another size."""
    if rec.get("event") == "done":
        return False
    if resume_epoch is not None and isinstance(rec.get("epoch"), (int, float)):
        if rec.get("event") in ("resume", "membership"):
            start, size = resumed_as or (resume_epoch, None)
            return rec["epoch"] < start - 1e-9 or (rec["epoch"] < resume_epoch - 1e-9 and rec.get("world_size") != size)
        return rec["epoch"] <= resume_epoch + 1e-9
    return rec.get("round", -1) < resume_round


def read_metrics(path: str, event: Optional[str] = None, until_damaged: bool = False):
    """The records of a metrics.jsonl (or a run directory), optionally of one event type.
    until_damaged: the records before the first line that is not JSON, instead of the ValueError.

    A line that is not JSON raises ValueError naming the file and line, except a last line without
    its newline: a write cut short (a full disk, a killed run, a run still writing), which is left
    out, so that the run can resume and its records be read. Non-object lines are skipped.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    recs = []
    with open(path) as fh:
        lines = fh.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if until_damaged or (n == len(lines) and not line.endswith("\n")):
                break
            raise ValueError(f"{path}:{n}: not a JSON record ({e.msg})") from None
        if isinstance(rec, dict) and (event is None or rec.get("event") == event):
            recs.append(_restore(rec))
    return recs


def training_rounds(records: List[Dict]) -> List[Dict]:
    """The round records, each with the exchange that ran early for it folded back in.

    An evaluation that a round follows runs that round's block exchange first (ResIST,
    Strategy.prepare_round): the eval record holds its seconds and bytes (t_next_exchange,
    bytes_next_exchange, bytes_cross_next_exchange, summed over ranks like a round's bytes), the
    round record what was left (nothing). Here they go back to the round: t_comm and the bytes
    (those across nodes too) are what the round cost, wherever it was paid."""
    early = {e["round"] + 1: e for e in records if e.get("event") == "eval" and e.get("bytes_next_exchange")}
    out = []
    for r in records:
        if r.get("event") != "round":
            continue
        e = early.get(r["round"])
        if e is not None:
            r = dict(r, t_comm=r["t_comm"] + e.get("t_next_exchange", 0.0),
                     bytes_sent=r["bytes_sent"] + e["bytes_next_exchange"],
                     bytes_recv=r["bytes_recv"] + e["bytes_next_exchange"],
                     **({"bytes_cross_node": r["bytes_cross_node"] + e.get("bytes_cross_next_exchange", 0)}
                        if "bytes_cross_node" in r else {}))
        out.append(r)
    return out
