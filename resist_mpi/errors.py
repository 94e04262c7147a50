"""The package's exception types that several layers raise (each module's own stay with it:
BlockError in blocks, PartitionError in partition, ConfigError in config, ...), and the one
line a process says when it ends the job."""
import sys
import threading


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite value (NaN or inf): a loss, a gradient average, a round's
    update or an average. Raised on every rank alike when the value is one every rank shares (an
    average); the CLI agrees on per-rank values first, then stops with exit status NONFINITE_EXIT."""


class UsageError(RuntimeError):
    """The library was used in a way that would train the wrong thing silently (an optimizer that
    misses this round's parameters, the full model asked for in the middle of a round, ...). The
    message names the fix."""


class PeerLost(ConnectionError):
    """A collective failed because another rank is gone (its process died, its link is down): the
    CLI ends with one line and exit status LOST_PEER_EXIT; a launcher that restarts workers
    (torchrun --max-restarts, the job scripts) then continues from the newest checkpoint."""


NONFINITE_EXIT = 4  # the CLI's exit status when training diverged (documented in the CLI reference)


_said = threading.Lock()


def say_last_line(line: str) -> bool:
    """Write the line that says why this process ends the job to stderr, unless it already wrote
    one: the watchdog's thread and the training loop can both find a lost peer at once, and the log
    should get one line from a process, not two. Whether it wrote."""
    if not _said.acquire(blocking=False):
        return False
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()
    return True
