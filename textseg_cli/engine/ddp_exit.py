"""Closing the process group without killing a rank: every rank reaches a barrier, then destroys the group.

Destroying a gloo group while a peer still talks to it aborts that peer ("terminate called without an
active exception") and torchrun then reports a failed job although training finished. On error paths the
barrier has a short timeout, so a rank that died does not keep the others waiting.
"""

from __future__ import annotations

import datetime as _dt


def shutdown_process_group(ok: bool = True) -> None:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return
    try:
        if tdist.get_backend() == "gloo":
            tdist.monitored_barrier(timeout=_dt.timedelta(seconds=300 if ok else 20))
        elif ok:  # nccl has no bounded barrier: only wait when every rank is known to be here
            tdist.barrier()
    except Exception:  # a peer is gone: still release this rank's resources
        pass
    finally:
        tdist.destroy_process_group()
