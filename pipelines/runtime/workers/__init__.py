"""The worker actors, one module per role.

``ShardWorker`` holds its rows for a whole fit and takes on every role that needs them
resident: the k-means step and samples (``rows``), the resampling refinement's
selections (``resample``), the row side of the balanced labels (``balance``) and, after the
fit, the labels of its rows, written to staging (``labels``). ``StreamWorker``
pulls a Ray Data split for mini-batch k-means. A worker's state derives from its
constructor arguments alone, so an actor that Ray restarts after a lost node is a correct
one (DESIGN invariant 8); its methods are pure functions of their arguments, save one
cache: each row's label of the last full step, where ``--search approx`` starts, and
its Hamerly bounds (``ops.bounds``), which let an exact step skip settled rows. A
rebuilt worker has neither and searches its rows afresh: the same labels, found slower.
"""

from pseudolabel.pipelines.runtime.workers.balance import BalanceRole
from pseudolabel.pipelines.runtime.workers.labels import LabelRole
from pseudolabel.pipelines.runtime.workers.resample import ResampleRole
from pseudolabel.pipelines.runtime.workers.rows import ResidentRows
from pseudolabel.pipelines.runtime.workers.stream import StreamWorker


class ShardWorker(ResampleRole, BalanceRole, LabelRole, ResidentRows):
    """Resident rows with the resampling, balance and label roles (roles first in the
    method order)."""


__all__ = ["ShardWorker", "StreamWorker"]
