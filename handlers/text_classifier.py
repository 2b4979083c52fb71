"""TextClassifierHandler: a non-LLM model with TorchServe's classic static batching.

TorchServe gathers up to ``batchSize`` requests (waiting at most ``maxBatchDelay``) and calls
``handle`` once; this handler runs one padded forward pass for all of them and returns one
JSON object per request: ``{"label", "score", "batch_size"}``. Body: ``{"text": "..."}`` as
JSON, or the raw text. A bad request gets a 400 through its own status, never failing the batch.
"""
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from ts.torch_handler.base_handler import BaseHandler

from handlers.protocol import ClassifyBody, RequestError, decode_body, field_error


class TextClassifierHandler(BaseHandler):
    """Sequence classification over a padded batch; labels from the checkpoint's id2label."""

    def initialize(self, context: Any) -> None:
        section = (context.model_yaml_config or {}).get("handler") or {}
        path = Path(section.get("model_path", "."))
        if not path.is_absolute():
            path = Path(context.system_properties["model_dir"]) / path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.max_length = int(section.get("max_length", 128))
        self.context = context
        self.initialized = True

    def _text(self, request: dict[str, Any]) -> str:
        body = request.get("body", request.get("data"))
        if isinstance(body, (bytes, bytearray)) and not body.strip().startswith(b"{"):
            body = body.decode("utf-8", errors="replace")
        if isinstance(body, str) and not body.lstrip().startswith("{"):
            text = body
        else:
            try:
                text = ClassifyBody.model_validate(decode_body(request)).text
            except ValidationError as exc:
                raise field_error(exc) from exc
        if not text.strip():
            raise RequestError("text: must not be empty", param="text")
        return text

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        replies: list[str | None] = [None] * len(data)
        texts, slots = [], []
        for idx, request in enumerate(data):
            try:
                texts.append(self._text(request))
                slots.append(idx)
            except RequestError as err:
                context.set_response_status(err.status, err.message[:200], idx)
                replies[idx] = json.dumps({"error": {"message": err.message, "param": err.param}})
        if texts:
            enc = self.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                probs = self.model(**enc).logits.softmax(-1)
            scores, labels = probs.max(-1)
            for idx, score, label in zip(slots, scores.tolist(), labels.tolist()):
                replies[idx] = json.dumps({"label": self.model.config.id2label[label],
                                           "score": round(score, 6), "batch_size": len(data)})
        return replies
