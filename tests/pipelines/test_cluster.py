import pytest

from pseudolabel.pipelines.runtime.session import size_pools
from tests.pipelines.conftest import fast_config


@pytest.mark.parametrize(
    "cpus, per_worker, algorithm, expected",
    [
        (2, 1.0, "lloyd", (2, 1)),
        (2, 0.5, "lloyd", (4, 2)),  # one whole CPU stays free for reads, not one slot
        (2, 1.0, "minibatch", (1, 1)),
        (16, 1.0, "lloyd", (16, 15)),
        (1, 1.0, "lloyd", (1, 1)),
    ],
)
def test_cpu_pools_leave_a_cpu_for_reads(cpus, per_worker, algorithm, expected):
    config = fast_config(
        input="a",
        output="b",
        workers=None,
        label_workers=None,
        cpus_per_worker=per_worker,
        algorithm=algorithm,
    )
    sizing = size_pools(config, {"CPU": cpus})
    assert (sizing.workers, sizing.label_workers) == expected
    assert sizing.device == "cpu"


def test_gpu_pools_follow_gpus():
    config = fast_config(input="a", output="b", workers=None, label_workers=None, gpus_per_worker=1)
    sizing = size_pools(config, {"CPU": 32, "GPU": 4})
    assert (sizing.workers, sizing.label_workers, sizing.device) == (4, 4, "cuda")
    # Scaling from zero: no GPU visible yet, so one worker unless --workers says more.
    assert size_pools(config, {"CPU": 2}).workers == 1
