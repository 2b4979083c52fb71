"""lm-evaluation-harness itself (optional: ``pip install -c constraints.txt -e .[eval]``; skipped
without it) runs two small tasks of our own against the real TorchServe with its
``local-completions`` and ``local-chat-completions`` backends, default settings and four
requests in flight, and scores them exactly as its ``hf`` backend does on the same checkpoint:
a multiple-choice task (loglikelihood: echo + logprobs) and a generation task (generate_until),
sample by sample. One setting differs from the defaults, and why is said where it is set.""" 
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # everything here is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
MC = [{"question": q, "choices": c, "answer": a} for q, c, a in [
    ("2 + 2 =", [" 4", " 5", " 22"], 0), ("The capital of France is", [" Paris", " Rome"], 0),
    ("Once upon a", [" time", " midnight", " hill"], 0), ("The sky is", [" blue", " green"], 0),
    ("Water is", [" wet", " dry", " loud"], 0), ("One, two,", [" three", " four"], 0),
    ("Cats say", [" meow", " woof"], 0), ("The sun rises in the", [" east", " west"], 1)]]
GEN = [{"question": q, "answer": a} for q, a in [
    ("What is 3 + 4?", "7"), ("Name a colour.", "red"), ("Say hello.", "hello"),
    ("Count to three.", "1 2 3"), ("What is the opposite of up?", "down")]]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, docs in (("mc", MC), ("gen", GEN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\n"
              "test_split: test\n")
    (root / "ts_mc.yaml").write_text(
        "task: ts_mc\n" + common.format(path=root / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "ts_gen.yaml").write_text(
        "task: ts_gen\n" + common.format(path=root / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: 'Q: {{question}}\\nA:'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n\\n', 'Q:']\n"
        "  max_gen_toks: 16\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")
    return TaskManager(include_path=str(root))


def _evaluate(tasks: TaskManager, model: str, model_args: dict, names: list[str],
              chat: bool = False) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names,
                                   task_manager=tasks, log_samples=True,
                                   apply_chat_template=chat, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def _samples(result: dict, task: str) -> list:
    return [(s["doc_id"], s["filtered_resps"]) for s in sorted(result["samples"][task],
                                                               key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def hf_results(tasks, archives) -> dict:
    args = {"pretrained": str(CHECKPOINT), "dtype": "float32", "device": "cpu"}
    return {"plain": _evaluate(tasks, "hf", args, ["ts_mc", "ts_gen"]),
            "chat": _evaluate(tasks, "hf", args, ["ts_gen"], chat=True)}


def _close(got: list, want: list) -> None:
    for (gid, g), (wid, w) in zip(got, want, strict=True):
        assert gid == wid
        for a, b in zip(g, w, strict=True):
            if isinstance(b, (list, tuple)):        # (loglikelihood, is_greedy)
                assert a[0] == pytest.approx(b[0], abs=1e-3) and a[1] == b[1]
            else:
                assert a == b


@pytest.mark.parametrize("batch_size", [1, 4])
def test_local_completions_scores_as_hf(server, tasks, hf_results, monkeypatch, batch_size):
    monkeypatch.setenv("OPENAI_API_KEY", server.inference_key)
    # add_bos_token: the harness's hf backend encodes with the tokenizer's defaults (this one
    # prepends BOS), its API backends without special tokens unless told; on a tokenizer
    # that adds none (SmolLM2's) the defaults agree
    args = {"base_url": f"{server.url()}/predictions/llm/1.0/v1/completions",
            "model": "llm", "tokenizer": str(CHECKPOINT), "num_concurrent": 4,
            "batch_size": batch_size, "max_retries": 1, "add_bos_token": True}
    got = _evaluate(tasks, "local-completions", args, ["ts_mc", "ts_gen"])
    want = hf_results["plain"]
    for task in ("ts_mc", "ts_gen"):
        _close(_samples(got, task), _samples(want, task))
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["ts_mc"][metric] == want["results"]["ts_mc"][metric]
    assert got["results"]["ts_gen"]["exact_match,none"] == \
        want["results"]["ts_gen"]["exact_match,none"]


def test_local_chat_completions_generates_as_hf(server, tasks, hf_results, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", server.inference_key)
    args = {"base_url": f"{server.url()}/predictions/llm/1.0/v1/chat/completions",
            "model": "llm", "num_concurrent": 4, "max_retries": 1}
    got = _evaluate(tasks, "local-chat-completions", args, ["ts_gen"], chat=True)
    _close(_samples(got, "ts_gen"), _samples(hf_results["chat"], "ts_gen"))
