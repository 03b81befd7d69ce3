"""The attack client for text classifiers: texts as one v2 ``BYTES`` input (``content_type: str``).

Same key rotation, refusal handling and request ids as :class:`GuardClient`; only the body differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from ._client import Answer, GuardClient

__all__ = ["TextClient", "text_body"]


def text_body(texts: Sequence[str]) -> bytes:
    """A v2 request for ``texts``, one per row, asking for the class probabilities."""
    tensor = {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts),
              "parameters": {"content_type": "str"}}
    return orjson.dumps({"inputs": [tensor], "outputs": [{"name": "predict_proba"}]})


@dataclass
class TextClient(GuardClient):
    """Queries a text classifier through ``url``; ``answered_rows`` collects the answered texts."""

    def predict_texts(self, texts: Sequence[str]) -> Answer:
        """Answer every text (in ``batch_size`` requests); raises AttackBlocked when no key is left."""
        labels: list[np.ndarray] = []
        probas: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            ans = self._exchange(text_body(chunk), chunk)
            labels.append(ans.labels)
            if ans.probabilities is not None:
                probas.append(ans.probabilities)
        proba = np.concatenate(probas) if len(probas) == len(labels) else None
        return Answer(np.concatenate(labels), proba)
