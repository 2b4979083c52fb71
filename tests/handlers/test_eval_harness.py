"""The requests lm-evaluation-harness sends, built here exactly as its ``local-completions``
and ``local-chat-completions`` backends build them (lm-eval 0.4.13, with its default settings
and several requests in flight), scored as it scores them, against transformers on the same
checkpoint in fp32 (what its ``hf`` backend computes): loglikelihood through echo + logprobs
(``max_tokens`` 1 as the harness sends, and 0), generate_until through token-id prompt arrays
and chat messages. tests/handlers/test_lm_eval.py runs the harness itself when installed."""
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
PAIRS = [("Question: 2 + 2 =", " 4"), ("Question: 2 + 2 =", " five"),
         ("The capital of France is", " Paris"), ("The capital of France is", " a big city"),
         ("Once upon a", " time"), ("Once upon a", " midnight dreary"),
         ("a b c d", " e"), ("a b c d", " f g")]
CONTEXTS = ["Question: what is 3 + 4?\nAnswer:", "Once upon a time", "The sky is",
            "List: one, two,"]
STOP = ["\n\n", "Question:", "</s>"]         # the task's ``until`` plus the EOS text


@pytest.fixture(scope="module")
def hf(archives):
    """transformers' model and tokenizer of the checkpoint the server serves."""
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(CHECKPOINT)


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal split: encode the whole, the context's tokens first."""
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return whole[:len(ctx)], whole[len(ctx):]


def _hf_loglikelihood(model, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    targets = torch.tensor(ids[ctxlen:])
    rows = logprobs[ctxlen - 1:len(ids) - 1]
    return (rows.gather(1, targets[:, None]).sum().item(),
            bool((rows.argmax(dim=-1) == targets).all()))


def _hf_generate(model, tok, ids: list[int], max_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    for stop in STOP:
        text = text.split(stop)[0]
    return text


def _post(server, route: str, payloads: list[dict]) -> list[dict]:
    url = f"{server.url()}/predictions/llm/1.0/{route}"

    def one(body: dict) -> dict:
        reply = requests.post(url, json=body, headers=server.headers(), timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()
    with ThreadPoolExecutor(4) as pool:                  # num_concurrent 4
        return list(pool.map(one, payloads))


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_loglikelihood_requests_score_as_transformers(server, hf, max_tokens):
    model, tok = hf
    encoded = [_encode_pair(tok, c, x) for c, x in PAIRS]
    batches = [encoded[i:i + 3] for i in range(0, len(encoded), 3)]     # batch_size 3
    payloads = [{"model": "llm", "prompt": [ctx + cont for ctx, cont in batch], "temperature": 0,
                 "max_tokens": max_tokens, "logprobs": 1, "seed": 1234, "echo": True}
                for batch in batches]
    got = []
    for reply, batch in zip(_post(server, "v1/completions", payloads), batches):
        for choice, (ctx, _) in zip(sorted(reply["choices"], key=itemgetter("index")), batch):
            lp = choice["logprobs"]
            end = len(lp["token_logprobs"]) - max_tokens          # the harness drops [-1]
            tokens, tops = lp["token_logprobs"][len(ctx):end], lp["top_logprobs"][len(ctx):end]
            got.append((sum(tokens), all(t == max(top.values()) for t, top in zip(tokens, tops))))
    want = [_hf_loglikelihood(model, ctx + cont, len(ctx)) for ctx, cont in encoded]
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-3)
    # the choices the harness would pick, pair by pair
    assert [got[i][0] > got[i + 1][0] for i in range(0, len(got), 2)] == \
        [want[i][0] > want[i + 1][0] for i in range(0, len(want), 2)]


def test_generate_until_requests_answer_as_transformers(server, hf):
    model, tok = hf
    encoded = [tok.encode(c, add_special_tokens=False) for c in CONTEXTS]
    payloads = [{"prompt": encoded[i:i + 2], "model": "llm", "max_tokens": 16,
                 "temperature": 0, "stop": STOP, "seed": 1234} for i in (0, 2)]
    texts = []
    for reply in _post(server, "v1/completions", payloads):
        slots = [None] * len(reply["choices"])
        for choice in reply["choices"]:
            slots[choice["index"]] = choice["text"]
        texts += slots
    assert texts == [_hf_generate(model, tok, ids, 16) for ids in encoded]


def test_chat_generate_until_requests_answer_as_transformers(server, hf):
    model, tok = hf
    chats = [[{"role": "user", "content": c}] for c in CONTEXTS]
    payloads = [{"messages": m, "model": "llm", "max_tokens": 16, "temperature": 0,
                 "stop": STOP, "seed": 1234} for m in chats]
    texts = [r["choices"][0]["message"]["content"]
             for r in _post(server, "v1/chat/completions", payloads)]
    want = [_hf_generate(model, tok, tok.encode(tok.apply_chat_template(
        m, tokenize=False, add_generation_prompt=True), add_special_tokens=False), 16)
        for m in chats]
    assert texts == want
