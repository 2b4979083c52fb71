"""Request parsing and response framing, without a server."""
import json
import os
import math
from types import SimpleNamespace

import pytest

from engine import RequestOutput
from handlers.framing import Framer
from handlers.protocol import RequestError, parse_request
from handlers.settings import HandlerSettings


class Tok:
    chat_template = None


def parse(body, path: str = "", **kw):
    return parse_request({"body": body}, path, Tok(), **kw)


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"), ({"prompt": 3}, "prompt"), ({"prompt": ["a"]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "lots"}, "max_tokens"),
    ({"prompt": "x", "temperature": math.nan}, "temperature"),
    ({"prompt": "x", "top_p": math.inf}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "colour": 1}, "colour"),
    ({}, "prompt"),
])
def test_bad_bodies_name_the_field(body, field):
    with pytest.raises(RequestError) as err:
        parse(body)
    assert err.value.status == 400 and err.value.message.startswith(field)
    assert err.value.param == field


def test_not_json_and_unknown_route():
    for raw in (b"{oops", "plain text", None, b"[1, 2]"):
        with pytest.raises(RequestError, match="JSON"):
            parse_request({"body": raw}, "", Tok())
    with pytest.raises(RequestError) as err:
        parse({"prompt": "x"}, "v2/whatever")
    assert err.value.status == 404


def test_native_and_openai_bodies():
    req = parse({"prompt": [5, 6], "stream": True, "temperature": 0, "stop": "x"})
    assert req.api == "generate" and req.prompts == [[5, 6]] and req.stream
    assert req.params.stop == ["x"] and req.params.max_tokens == 16
    req = parse({"model": "llm", "prompt": ["only one"], "max_tokens": 3, "user": "u",
                 "stream_options": {"include_usage": True}, "stream": True}, "v1/completions")
    assert req.api == "completions" and req.prompts == ["only one"] and req.include_usage
    req = parse({"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                 "max_completion_tokens": 7}, "v1/chat/completions")
    assert req.prompts == ["user: hi\nassistant:"] and req.params.max_tokens == 7
    assert parse(None, "v1/models").api == "models"
    with pytest.raises(RequestError, match="max_tokens"):
        parse({"prompt": "x", "max_tokens": 99}, max_tokens_limit=50)


@pytest.mark.parametrize("path, body, field", [
    ("v1/completions", {"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
    ("v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True},
     "echo"),
    ("v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "best_of": 3},
     "best_of"),
    ("v1/completions", {"prompt": "x", "tools": [{"type": "function"}]}, "tools"),
])
def test_unsupported_openai_options_are_refused_not_ignored(path, body, field):
    with pytest.raises(RequestError) as err:
        parse(body, path)
    assert err.value.status == 400 and err.value.param == field
    no_op = {"top_logprobs": None, "echo": False, "best_of": 1, "tools": None}[field]
    assert parse({**body, field: no_op}, path).params is not None


def finished(text=("a", "b"), reason="length"):
    history = [RequestOutput("r1", t, [i + 1]) for i, t in enumerate(text)]
    history[-1].finish_reason = reason
    return SimpleNamespace(text=list(text), token_ids=[1, 2], finish_reason=reason, error=None,
                           prompt_tokens=3, completion_tokens=2, finished=True, history=history)


def test_ndjson_last_line_has_finish_and_usage():
    framer = Framer("generate", True, False, "r1", "llm")
    outs = finished().history
    lines = framer.chunk(outs, finished()).splitlines()
    assert [json.loads(x)["text"] for x in lines] == ["a", "b"]
    assert json.loads(lines[-1])["usage"]["total_tokens"] == 5
    assert "finish_reason" not in json.loads(lines[0])
    whole = json.loads(Framer("generate", False, False, "r1", "llm").whole(finished()))
    assert whole["text"] == "ab" and whole["finish_reason"] == "length"


def test_sse_chunks_end_with_done():
    framer = Framer("chat", True, True, "r1", "llm")
    body = framer.chunk([RequestOutput("r1", "hey", [1], "abort")], finished(reason="abort"))
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"content": "hey", "role": "assistant"}
    assert json.loads(events[1][6:])["choices"][0]["finish_reason"] == "stop"
    assert json.loads(events[2][6:])["usage"]["completion_tokens"] == 2


def test_settings_resolve_model_path(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    ctx = SimpleNamespace(model_yaml_config={"handler": {"model_path": "checkpoint",
                                                          "max_num_seqs": 8}},
                          system_properties={"model_dir": str(tmp_path)})
    settings = HandlerSettings.from_context(ctx)
    assert settings.model_path == str(tmp_path / "checkpoint")
    assert settings.engine_args()["max_num_seqs"] == 8
    ctx.model_yaml_config["handler"]["max_num_sqs"] = 8
    with pytest.raises(ValueError, match="max_num_sqs"):
        HandlerSettings.from_context(ctx)


def test_settings_place_each_worker(tmp_path, monkeypatch):
    """CPU: the cores split over maxWorkers unless num_threads or OMP_NUM_THREADS is set,
    one of a share of several left to the frontend in steps of few tokens; CUDA: the gpu_id TorchServe assigned the worker, unless the config names a device index."""
    (tmp_path / "checkpoint").mkdir()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))

    def placed(handler: dict, workers: int | None = None, gpu_id: int | None = None) -> dict:
        config = {"handler": {"model_path": "checkpoint"} | handler}
        if workers is not None:
            config["maxWorkers"] = workers
        props = {"model_dir": str(tmp_path)} | ({"gpu_id": gpu_id} if gpu_id is not None else {})
        ctx = SimpleNamespace(model_yaml_config=config, system_properties=props)
        return HandlerSettings.from_context(ctx).engine_args()

    assert placed({})["num_threads"] == cores
    assert placed({}).get("few_rows_threads") == (cores - 1 if cores > 1 else None)
    assert placed({}, workers=2)["num_threads"] == max(1, cores // 2)
    assert placed({}, workers=4 * cores)["num_threads"] == 1
    assert "few_rows_threads" not in placed({}, workers=4 * cores)
    assert placed({"few_rows_threads": 1}, workers=1)["few_rows_threads"] == 1
    assert placed({"num_threads": 3}, workers=2) == {"num_threads": 3}
    assert placed({"device": "cuda"}, workers=2, gpu_id=1) == {"device": "cuda:1"}
    assert placed({"device": "cuda:0"}, gpu_id=1) == {"device": "cuda:0"}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "num_threads" not in placed({}, workers=2)


def test_settings_tensor_parallel_from_torchrun(tmp_path, monkeypatch):
    """parallelType tp: tensor_parallel_size is torchrun's WORLD_SIZE, the rank is RANK, the
    cores split over the worker's ranks; without torchrun it is an error at load."""
    (tmp_path / "checkpoint").mkdir()
    for var in ("OMP_NUM_THREADS", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def settings() -> HandlerSettings:
        ctx = SimpleNamespace(model_yaml_config={"parallelType": "tp",
                                                 "handler": {"model_path": "checkpoint"}},
                              system_properties={"model_dir": str(tmp_path)})
        return HandlerSettings.from_context(ctx)

    with pytest.raises(ValueError, match="parallelType: tp needs a torchrun: block"):
        settings()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    s = settings()
    assert s.engine_args()["tensor_parallel_size"] == 2 and s.tensor_parallel_rank == 1
    assert s.engine_args()["num_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.setenv("RANK", "0")
    assert settings().tensor_parallel_rank == 0
