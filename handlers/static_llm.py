"""StaticBatchingLLMHandler: the same LLM served the classic TorchServe way, as the baseline.

TorchServe gathers up to ``batchSize`` requests within ``maxBatchDelay``; this handler
left-pads their prompts and runs transformers ``generate`` once per group of requests that
share temperature and ignore_eos, up to the longest max_tokens in the group, then returns whole
texts. Every request in the batch waits for the longest one and nothing streams: the
behaviour continuous batching removes. Body: ``{"prompt" (text or token ids), "max_tokens",
"temperature", "ignore_eos"}``; reply: ``{"text", "token_ids", "finish_reason", "usage",
"batch_size"}``.
"""
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer
from ts.torch_handler.base_handler import BaseHandler

from handlers.protocol import RequestError, StaticGenerateBody, decode_body, field_error
from engine import EngineConfig
from handlers.settings import HandlerSettings


class StaticBatchingLLMHandler(BaseHandler):
    """Padded-batch ``generate``; one whole JSON answer per request."""

    def initialize(self, context: Any) -> None:
        settings = HandlerSettings.from_context(context)
        path, source = Path(settings.model_path), {}
        if path.suffix == ".gguf":      # transformers dequantizes it to dense weights
            path, source = path.parent, {"gguf_file": path.name}
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        engine = EngineConfig(**settings.engine_args())     # same dtype/device checks
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, engine.dtype),
                                                          **source)
        self.device = torch.device(engine.device)
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.context = context
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        replies: list[str | None] = [None] * len(data)
        groups: dict[tuple[float, bool], list[tuple[int, StaticGenerateBody]]] = {}
        for idx, request in enumerate(data):
            try:
                body = StaticGenerateBody.model_validate(decode_body(request))
                self._check_ids(body.prompt)
            except ValidationError as exc:
                err = field_error(exc)
            except RequestError as exc:
                err = exc
            else:
                groups.setdefault((body.temperature, body.ignore_eos), []).append((idx, body))
                continue
            context.set_response_status(err.status, err.message[:200], idx)
            replies[idx] = json.dumps({"error": {"message": err.message, "param": err.param}})
        for (temperature, ignore_eos), members in groups.items():
            for idx, reply in self._generate(members, temperature, ignore_eos):
                replies[idx] = json.dumps(reply | {"batch_size": len(data)})
        return replies

    def _check_ids(self, prompt: str | list[int]) -> None:
        vocab = self.model.config.vocab_size
        if isinstance(prompt, list) and not all(0 <= t < vocab for t in prompt):
            raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")

    def _generate(self, members: list[tuple[int, StaticGenerateBody]], temperature: float,
                  ignore_eos: bool) -> list[tuple[int, dict[str, Any]]]:
        ids = [self.tokenizer(b.prompt)["input_ids"] if isinstance(b.prompt, str) else b.prompt
               for _, b in members]
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        longest = max(b.max_tokens for _, b in members)
        knobs: dict[str, Any] = {"max_new_tokens": longest, "do_sample": temperature > 0,
                                 "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            knobs.update(temperature=temperature, top_k=0, top_p=1.0)
        if ignore_eos:
            knobs["min_new_tokens"] = longest
        with torch.inference_mode():
            out = self.model.generate(**enc, **knobs)
        results = []
        width = enc["input_ids"].shape[1]
        for row, (idx, body) in enumerate(members):
            ids = out[row, width:].tolist()[:body.max_tokens]
            reason = "length"
            if not ignore_eos:
                for pos, tok in enumerate(ids):
                    if tok in self.eos_ids:
                        ids, reason = ids[:pos + 1], "stop"
                        break
            prompt_tokens = int(enc["attention_mask"][row].sum())
            results.append((idx, {
                "text": self.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                "finish_reason": reason,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                          "total_tokens": prompt_tokens + len(ids)}}))
        return results
