"""What this installation can do, in one line (like `horovodrun --check-build`):

    python -m resist_mpi.check            # one line
    python -m resist_mpi.check --json     # the same, as JSON

torch and its CUDA build, the GPUs this process sees, NCCL, the MPI library mpi4py loads (and
whether it is CUDA-aware), Horovod and the controllers and GPU operations it was built with, and the
backend --backend auto would pick here. Run it on a compute node (under srun, or in a job) to see
what the jobs will see; it starts no MPI job and sends nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Dict, Optional, Sequence


def _mpi() -> Dict:
    try:
        import mpi4py
        from mpi4py import MPI
    except Exception as e:  # noqa: BLE001 - mpi4py missing or its MPI library not loadable
        return {"mpi": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    from ..comm.mpi import cuda_aware
    return {"mpi": MPI.Get_library_version().strip().splitlines()[0].split(",")[0], "mpi4py": mpi4py.__version__,
            "cuda_aware": cuda_aware()}


def _horovod() -> Optional[Dict]:
    if importlib.util.find_spec("horovod") is None:
        return None
    try:
        import horovod
        import horovod.torch as hvd
    except Exception as e:  # noqa: BLE001 - installed but not importable with this torch
        return {"version": None, "error": f"{type(e).__name__}: {e}"}
    return {"version": horovod.__version__, "mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built()),
            "nccl": bool(hvd.nccl_built())}


def report() -> Dict:
    import torch
    import torch.distributed as dist

    from .. import __version__
    from ..comm import resolve_backend
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"resist_mpi": __version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "gpus": gpus, "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)],
            "nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available(), **_mpi(),
            "horovod": _horovod(), "auto_backend": resolve_backend("auto")}


def one_line(r: Dict) -> str:
    gpus = f"{r['gpus']} GPU(s)" + (f" ({r['gpu_names'][0]})" if r["gpus"] else "")
    parts = [f"resist_mpi {r['resist_mpi']}",
             f"torch {r['torch']} ({'CUDA ' + r['torch_cuda'] if r['torch_cuda'] else 'CPU'} build), {gpus} visible",
             f"NCCL {'yes' if r['nccl'] else 'no'}, gloo {'yes' if r['gloo'] else 'no'}"]
    if r.get("mpi"):
        parts.append(f"MPI: {r['mpi']} via mpi4py {r['mpi4py']}, CUDA-aware {'yes' if r['cuda_aware'] else 'no'}")
    else:
        parts.append(f"MPI: not usable ({r.get('error')})")
    h = r["horovod"]
    if h is None:
        parts.append("Horovod: not installed (make horovod)")
    elif h.get("version") is None:
        parts.append(f"Horovod: does not import ({h['error']})")
    else:
        built = [k for k in ("mpi", "gloo", "nccl") if h[k]]
        parts.append(f"Horovod {h['version']} built with {'+'.join(built).upper() or 'nothing'}")
    parts.append(f"--backend auto: {r['auto_backend']}")
    return " | ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resist_mpi.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of one line")
    args = p.parse_args(argv)
    r = report()
    print(json.dumps(r, indent=2) if args.json else one_line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
