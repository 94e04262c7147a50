"""Averages of model tensors across ranks: a round's average (`rounds`: plain, hierarchical,
compressed, overlapped, with an outer step), the per-backward gradient average (`gradients`),
one-off averages and broadcasts (`tensors`) and the wire codecs (`compression`)."""
from .gradients import GradientAverager
from .rounds import Averager, replay_outer_step
from .tensors import average_tensors_, broadcast_tensors_

__all__ = ["Averager", "GradientAverager", "average_tensors_", "broadcast_tensors_", "replay_outer_step"]
