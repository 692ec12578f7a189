"""SLURM's warning before a time limit (SIGUSR1): recorded by the handler, acted on at a stage's safe points,
the same decision on every rank. The whole path on a real cluster: test_slurm.py::test_time_limit_requeue."""
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import stage
from pipeline.distributed import free_port
from pipeline.errors import TimeLimit


@pytest.fixture
def watched(monkeypatch):
    monkeypatch.setattr(stage, "_time_limit_signalled", False)
    previous = signal.getsignal(signal.SIGUSR1)
    stage.watch_time_limit()
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_the_warning_stops_a_stage_at_its_next_safe_point_not_where_it_lands(watched):
    stage.stop_at_time_limit("before the signal")  # nothing yet
    os.kill(os.getpid(), signal.SIGUSR1)
    reached = True  # the handler raised nothing into the code that was running
    assert reached and stage.time_limit_signalled()
    with pytest.raises(TimeLimit, match="between shards"):
        stage.stop_at_time_limit("between shards")


def _rank(rank: int, port: int, stops) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:  # work one rank does alone (the search scoring its candidates) asks only itself
        assert stage.time_limit_signalled() is False
    stage._time_limit_signalled = False
    stage.watch_time_limit()
    for point in range(10):
        if rank == 1 and point == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # the warning reaches one rank only
        dist.all_reduce(torch.ones(1))  # the work between safe points: a collective every rank joins
        try:
            stage.stop_at_time_limit(f"at point {point}", dist.group.WORLD)
        except TimeLimit:
            stops[rank] = point
            break
    dist.destroy_process_group()


def test_every_rank_of_a_group_stops_at_the_same_point_when_one_is_warned():
    stops = mp.Manager().dict()
    mp.spawn(_rank, args=(free_port(), stops), nprocs=2)
    assert dict(stops) == {0: 3, 1: 3}
