"""The GPU path audited on CPU: what would make the host wait for the device, counted.

A TorchFunctionMode records every call that reads a tensor back to the host (``item``,
``tolist``, ``bool()``, ``int()``, ``cpu``, ...), every tensor built from Python data with a
``device=`` (on CUDA, a blocking upload), and every device move with its ``non_blocking`` flag.
Kernel launches run unaudited (the Triton interpreter reads its arguments on the host; a GPU
launch does not). With the Triton backend forced:
- the model forward (every layer) makes none of them;
- a whole engine step uploads its metadata in one non-blocking copy; the sampler reads back
  once (the sampled tokens), whatever the mix of greedy, seeded, filtered and penalized rows,
  and the non-finite-logits check is the step's only other read.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import kernels
from engine import LLMEngine, SamplingParams
from kernels.triton_launch import Launch

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}
BUILDS = {torch.tensor, torch.as_tensor, torch.asarray}
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_}


def _is_device(x) -> bool:
    return isinstance(x, torch.device) or (isinstance(x, str) and x.split(":")[0] in
                                           ("cpu", "cuda"))


class HostSyncAudit(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.device_builds: list[str] = []
        self.moves: list[bool] = []          # non_blocking flag of each device move
        self.launches = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            if func in READS:
                self.reads.append(func.__name__)
            elif func in BUILDS and kwargs.get("device") is not None:
                self.device_builds.append(func.__name__)
            elif func in MOVES and (func is not torch.Tensor.to
                                    or any(map(_is_device, [*args[1:], kwargs.get("device")]))):
                self.moves.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


@pytest.fixture
def audit(monkeypatch):
    """The audit, with kernel launches counted and run outside it."""
    mode = HostSyncAudit()
    launch = Launch.__call__

    def unaudited(self):
        mode.launches += 1
        paused, mode.paused = mode.paused, True
        try:
            launch(self)
        finally:
            mode.paused = paused
    monkeypatch.setattr(Launch, "__call__", unaudited)
    yield mode
    kernels.set_backend("auto")


def _engine(tiny_llama) -> LLMEngine:
    return LLMEngine(tiny_llama, attention_backend="triton", num_blocks=64,
                     max_num_batched_tokens=64, max_num_seqs=8)


def test_forward_makes_no_host_sync(tiny_llama, audit) -> None:
    llm = _engine(tiny_llama)
    model = llm.runner.model
    calls = []
    forward = model.forward

    def audited_forward(*args):
        calls.append(args)
        with audit:
            return forward(*args)
    model.forward = audited_forward
    llm.generate(["a prompt of some length", "x", [7] * 40], SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(calls) == 3, "one prefill step, two decode steps"
    num_layers = model.spec.num_layers
    assert audit.launches >= 2 * num_layers * len(calls), "store + attention in every layer"
    assert audit.reads == [] and audit.device_builds == [] and audit.moves == []


def test_step_uploads_once_and_sampler_reads_back_once(tiny_llama, audit) -> None:
    llm = _engine(tiny_llama)
    runner = llm.runner
    run, metadata = runner.run, runner._views
    steps: list[dict] = []

    def audited_metadata(*args):
        before = len(audit.moves)
        out = metadata(*args)
        steps[-1]["metadata_moves"] = audit.moves[before:]
        return out

    def audited_run(*args):
        steps.append({})
        before = (len(audit.reads), len(audit.moves), len(audit.device_builds))
        with audit:
            tokens = run(*args)
        steps[-1].update(reads=audit.reads[before[0]:], moves=audit.moves[before[1]:],
                         device_builds=audit.device_builds[before[2]:],
                         sampled=sum(t is not None for t in tokens))
        return tokens
    sampler = runner.sampler

    def audited_sampler(*args):
        before = len(audit.reads)
        out = sampler(*args)
        steps[-1]["sampler_reads"] = audit.reads[before:]
        return out
    runner.run, runner._views, runner.sampler = audited_run, audited_metadata, audited_sampler
    mixed = [SamplingParams(temperature=0, max_tokens=4),
             SamplingParams(temperature=0.8, seed=3, top_k=20, top_p=0.9, max_tokens=4),
             SamplingParams(temperature=1.0, min_p=0.05, min_tokens=2, max_tokens=4),
             SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.2, seed=11, max_tokens=4)]
    for i, params in enumerate(mixed):
        llm.add_request(f"r{i}", [5 + i, 9, 13] * (i + 1), params)
    while llm.has_unfinished():
        llm.step()
    assert any(s["sampled"] == len(mixed) for s in steps), "one step samples every kind of row"
    for s in steps:
        assert s["metadata_moves"] == [True], s      # one non-blocking copy of all metadata
        if s["sampled"]:
            # The sampler reads back once: the tokens. engine/faults.py's check for non-finite
            # logits rows is the step's one other read (a bool per row); fusing the two into
            # one transfer is left for when a GPU can show it matters.
            assert s["sampler_reads"] == ["tolist"], s
            assert s["reads"] == ["tolist", "tolist"], s
        else:
            assert s["reads"] == [], s
        assert s["device_builds"] == [] and all(s["moves"]), s
