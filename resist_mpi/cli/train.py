"""Train a pre-activation ResNet with ResIST (or a baseline) across MPI ranks.

    mpirun -np 4 python -m resist_mpi.train --model preact_resnet101 --width 16 --epochs 30
    horovodrun -np 16 python -m resist_mpi.train --dataset cifar100 --data-dir /scratch/cifar
    srun python -m resist_mpi.train --config run.yaml --resume auto
    python -m resist_mpi.train --help

Every flag is a field of resist_mpi.cli.config.Config; --config FILE (YAML/JSON) sets the same keys.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple

from .config import ConfigError, parse_config, validate


def main(argv: Optional[Sequence[str]] = None) -> int:
    # A rank that crashes in native code (a segmentation fault in MPI, torch, a driver) prints the
    # Python stack of each of its threads before it dies, so the log says where, not only that.
    # Enabled before MPI starts: Open MPI then leaves its own handler out (it only reports "signal 11").
    import faulthandler
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    # Settings are checked before anything is loaded: every rank fails alike, one line (printed by
    # rank 0 only), exit 2 (bad_settings: how the ranks end together).
    parsed = None
    try:
        parsed = parse_config(argv)
        cfg = validate(parsed)
    except ConfigError as e:
        return bad_settings(e, _launch_settings(parsed, argv))

    # A stop signal (SIGTERM, SIGUSR1) from here on sets the flag the training loop acts on, also
    # one that comes while torch loads, the ranks connect or the data is read: the run then stops
    # after its first round with a checkpoint and exit 99, as a job script expects (SIGUSR1's own
    # action would end the rank, and the script relaunch it instead of requeueing the job).
    from .preempt import StopRequest
    stop_request = StopRequest()

    import os

    from .. import comm
    from .trainer import Trainer
    os.environ["RESIST_MPI_PROGRESS"] = cfg.mpi_progress  # read by the mpi backend (comm/mpi.py)
    c = comm.init(cfg.backend, device=cfg.device)
    trainer = Trainer(cfg, c, stop_request)
    result = trainer.run()
    if trainer.exit_code:  # REQUEUE_EXIT: a stop signal, checkpoint written; NONFINITE_EXIT: diverged
        return trainer.exit_code
    if c.rank == 0 and result:
        print(f"final test accuracy: {100 * result['test_acc']:.2f}% (test loss {result['test_loss']:.4f}, "
              f"epoch {result['epoch']:.2f}); metrics in {cfg.out}/metrics.jsonl", flush=True)
    return 0


def _launch_settings(parsed, argv: Optional[Sequence[str]]) -> Tuple[str, str, bool]:
    """(backend, device, download) the ranks that accepted their settings start with: from the
    parsed settings, or (a flag or file that did not parse) from the flags as given."""
    if parsed is not None:
        return str(parsed.backend), str(parsed.device), bool(parsed.download)
    argv = list(sys.argv[1:] if argv is None else argv)

    def flag(name: str, default: str) -> str:
        value = default
        for k, word in enumerate(argv):
            if word == name and k + 1 < len(argv):
                value = argv[k + 1]
            elif word.startswith(name + "="):
                value = word.split("=", 1)[1]
        return value
    return flag("--backend", "auto"), flag("--device", "auto"), "--download" in argv


def bad_settings(error: ConfigError, launch: Tuple[str, str, bool] = ("auto", "auto", False)) -> int:
    """One line from rank 0 and exit 2, on every rank, for a setting that every rank rejected.

    The ranks do not reject it at the same moment, and the first one to exit makes the launcher end
    the job: rank 0 could be ended before it said why (seen under mpirun: exit 2, no line). So where
    several ranks run, they first join the agreement that ends the trainer's set-up (trainer.agree:
    the failing rank prints, then every rank waits for every other, then all exit); a rank that
    accepted its settings (a file that only some nodes see) joins it from the trainer. If the
    communication cannot start, rank 0 prints without waiting.

    launch: (backend, device, download) as the accepting ranks start: the same backend (an
    accepting rank on a GPU starts NCCL, which an MPI or gloo world would never meet), and with
    --download the barrier the trainer's ranks pass before that agreement."""
    from ..comm import world_info_from_env
    info = world_info_from_env()
    if info.size > 1:
        backend, device, download = launch
        try:
            from .. import comm
            c = comm.init(backend, fail_fast=False, device=device)
        except Exception:  # noqa: BLE001 -- the line below is what matters; MPI's own failure is not it
            pass
        else:
            from .trainer import agree
            try:
                if download:
                    c.barrier()
                agree(c, error)
            except SystemExit as stop:
                return int(stop.code)
    if info.rank == 0:
        sys.stderr.write(f"resist_mpi: error: {error}\n")
        sys.stderr.flush()
    return 2


if __name__ == "__main__":
    sys.exit(main())
