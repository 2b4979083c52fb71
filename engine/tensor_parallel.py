"""Tensor parallelism across processes: the ranks, the messages rank 0 sends them, and the
loop the other ranks (followers) run.

Rank 0 is the engine's process: it schedules, samples and reports. Offline it spawns the
followers itself (``start``); under torchrun (TorchServe's ``parallelType: tp``) the ranks are
torchrun's and every rank joins through its environment. Each rank loads the checkpoint and
keeps only its shard (engine/models/sharding.py). Each step rank 0 sends the followers one
message: the flat int32 array the model runner already builds for the step and the block
copies before it (``STEP``); every rank then runs the forward together (the all-reduces sit
inside it) and the logits of the step's sampled rows, gathered at rank 0. Prompt logprobs ask
for more rows of the same step (``LOGITS``). ``STOP`` ends the followers.

Two process groups: ``control`` (gloo, CPU) carries the messages and waits as long as a
server idles; ``group`` (gloo on CPU, nccl on CUDA) carries the step's collectives with a
bounded timeout. A rank that dies closes its sockets, so the others' next collective fails at
once (a hung one: at the timeout); rank 0 then raises ``RanksLost`` for the step, the engine
ends every sequence with an error, and a follower exits. The ranks cannot be resynchronised
after a half-done step, so a lost rank ends the engine (TorchServe restarts the worker).
"""
import dataclasses
import datetime
import logging
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from engine.config import EngineConfig

__all__ = ["COLLECTIVE_TIMEOUT_S", "LOGITS", "Ranks", "RanksLost", "STEP", "follow",
           "follow_torchrun", "join_torchrun", "start"]

log = logging.getLogger(__name__)

STEP, LOGITS, STOP = 1, 2, 3
COLLECTIVE_TIMEOUT_S = 60.0         # one collective of a step; a dead peer fails it at once
IDLE_TIMEOUT = datetime.timedelta(days=3650)    # a follower waiting for the next step


class RanksLost(RuntimeError):
    """A rank died or stopped answering: the ranks are out of step for good."""


@dataclass
class Ranks:
    """This process's place among the ranks, and (rank 0, offline) the followers it started."""
    rank: int
    size: int
    group: dist.ProcessGroup            # the step's collectives
    control: dist.ProcessGroup          # messages from rank 0
    processes: list = field(default_factory=list)

    def send(self, op: int, payload: np.ndarray) -> None:
        """Rank 0: message ``op`` with an int32 ``payload`` to every follower."""
        dist.broadcast(torch.tensor([op, payload.size], dtype=torch.int64), 0,
                       group=self.control)
        if payload.size:
            dist.broadcast(torch.from_numpy(np.ascontiguousarray(payload, dtype=np.int32)), 0,
                           group=self.control)

    def receive(self) -> tuple[int, np.ndarray]:
        """A follower: the next message from rank 0."""
        header = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.control)
        payload = torch.empty(int(header[1]), dtype=torch.int32)
        if payload.numel():
            dist.broadcast(payload, 0, group=self.control)
        return int(header[0]), payload.numpy()

    def min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (every rank calls it)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, dist.ReduceOp.MIN, group=self.control)
        return int(t)

    def close(self) -> None:
        """Rank 0: stop the followers and leave the groups; idempotent, never raises."""
        if not dist.is_initialized():
            return
        try:
            self.send(STOP, np.zeros(0, dtype=np.int32))
        except Exception:   # noqa: BLE001 - a follower already gone: nothing to stop
            log.info("tensor parallel: a follower was gone at close")
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        try:
            dist.destroy_process_group()
        except Exception:   # noqa: BLE001 - at interpreter exit or after a lost rank
            log.info("tensor parallel: the process group was already torn down")


def start(config: EngineConfig, model_path: str, max_model_len: int) -> Ranks:
    """Rank 0's ranks for ``config.tensor_parallel_size``: torchrun's when launched by it
    with that world size, else followers spawned here (one process each)."""
    size = config.tensor_parallel_size
    if int(os.environ.get("WORLD_SIZE", 0)) == size and "LOCAL_RANK" in os.environ:
        return join_torchrun(size)
    if dist.is_initialized():
        raise RuntimeError("one tensor-parallel engine per process: close() the other first "
                           "(this process already belongs to a torch.distributed group)")
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=_follower, daemon=True, name=f"tp-rank-{rank}",
                             args=(rank, size, port, config, model_path, max_model_len))
                 for rank in range(1, size)]
    for p in processes:
        p.start()
    try:
        ranks = _join(0, size, f"tcp://127.0.0.1:{port}", config.device)
    except Exception:
        for p in processes:
            p.kill()
        raise
    ranks.processes = processes
    return ranks


def join_torchrun(size: int) -> Ranks:
    """This torchrun rank's place (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``)."""
    world = int(os.environ.get("WORLD_SIZE", 0))
    if world != size:
        raise ValueError(f"tensor_parallel_size {size} but torchrun started {world} ranks")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return _join(int(os.environ["RANK"]), size, "env://", device)


def follow_torchrun(model_path: str, **engine_args) -> None:
    """Run a rank other than 0 under torchrun (its environment names it): the same engine
    settings as rank 0's ``LLMEngine``, steps from rank 0 until it stops."""
    from engine.models import read_config, read_spec, sharding
    config = EngineConfig(**engine_args)
    spec = read_spec(read_config(model_path))
    sharding.check(spec, config.tensor_parallel_size)     # as rank 0, before joining it
    ranks = join_torchrun(config.tensor_parallel_size)
    follow(ranks, config, model_path, config.model_len(spec.max_position_embeddings))


def follow(ranks: Ranks, config: EngineConfig, model_path: str, max_model_len: int) -> None:
    """A follower: load this rank's shard, then run every step rank 0 sends until ``STOP``."""
    from engine.model_runner import ModelRunner
    config = dataclasses.replace(config, device=_device(config.device, ranks.rank))
    runner = ModelRunner(config, model_path, max_model_len, [], ranks)
    while True:
        op, payload = ranks.receive()
        if op == STOP:
            return
        if op == STEP:
            runner.replay(payload)
        elif op == LOGITS:
            runner.replay_logits(payload)
        else:
            raise RuntimeError(f"tensor parallel: unknown message {op}")


def _device(device: str, rank: int) -> str:
    """The device of ``rank``: its own GPU on CUDA (its index among the visible GPUs)."""
    if device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return device


def _join(rank: int, size: int, init_method: str, device: str) -> Ranks:
    began = time.monotonic()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(_device(device, rank))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=size, timeout=IDLE_TIMEOUT)
    ranks = list(range(size))
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    group = dist.new_group(ranks, timeout=timeout) if not cuda else \
        dist.new_group(ranks, timeout=timeout, backend="nccl")
    control = dist.new_group(ranks, timeout=IDLE_TIMEOUT, backend="gloo") if cuda else \
        dist.group.WORLD
    log.info("tensor parallel: rank %d of %d joined in %.1f s", rank, size,
             time.monotonic() - began)
    return Ranks(rank, size, group, control)


def _follower(rank: int, size: int, port: int, config: EngineConfig, model_path: str,
              max_model_len: int) -> None:
    """A spawned follower process (offline): join, follow, leave."""
    logging.basicConfig(level=logging.WARNING)
    ranks = _join(rank, size, f"tcp://127.0.0.1:{port}", config.device)
    try:
        follow(ranks, config, model_path, max_model_len)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
