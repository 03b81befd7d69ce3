"""The demo's text scenario: a support-ticket classifier (TF-IDF + logistic regression on generated
tickets, three classes) served as v2 ``BYTES`` next to the digits model, a text profile (``fit --text``),
and text traffic: benign tickets, tickets with zero-width characters, and a character-edit attack."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import orjson
from aiohttp import web

__all__ = ["TEXT_MODEL", "TicketModel", "add_text_routes", "fit_text_demo_profile", "text_traffic"]

TEXT_MODEL = "tickets"
_TEMPLATES = {
    "billing": ["I was charged twice for my {plan} plan this {when}", "please refund the {amount} payment from {when}",
                "my invoice for {when} shows the wrong {plan} price", "why did my card get charged {amount} again",
                "cancel my {plan} subscription and stop billing me"],
    "technical": ["the app crashes when I {action} on my {device}", "I cannot {action} since the update on {when}",
                  "error {code} appears every time I {action}", "my {device} freezes after I {action}",
                  "login fails with code {code} on the {device}"],
    "shipping": ["my {item} has not arrived since {when}", "the {item} I ordered came damaged",
                 "where is my parcel with the {item} tracking says {status}",
                 "the courier left my {item} at the wrong address", "delivery of the {item} is {status} again"],
}
_SLOTS = {
    "plan": ["basic", "premium", "family", "business", "student"], "when": ["monday", "last week", "march",
    "yesterday", "this month"], "amount": ["ten dollars", "the full amount", "49.99", "twice the fee"],
    "action": ["upload a photo", "open settings", "sync my files", "log in", "export a report"],
    "device": ["phone", "tablet", "laptop", "browser", "watch"], "code": ["500", "403", "e42", "timeout", "0x1f"],
    "item": ["blender", "jacket", "phone case", "book", "lamp"], "status": ["delayed", "lost", "on hold", "returned"],
}


def tickets(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` generated tickets and their class (0 billing, 1 technical, 2 shipping)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(3)
        template = rng.choice(_TEMPLATES[list(_TEMPLATES)[label]])
        texts.append(template.format(**{k: rng.choice(v) for k, v in _SLOTS.items()}))
        labels.append(label)
    return texts, labels


class TicketModel:
    """The victim: TF-IDF + logistic regression on generated tickets."""

    def __init__(self) -> None:
        from guard_agent.attacks import text_classifier

        self.train, self.y_train = tickets(900, seed=1)
        self.test, self.y_test = tickets(200, seed=2)
        self.clf = text_classifier(self.train, self.y_train)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(texts))


def add_text_routes(app: web.Application, model: TicketModel) -> None:
    """``POST /v2/models/tickets/infer`` taking one BYTES input (JSON), like MLServer's sklearn runtime."""

    async def infer(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        proba = model.predict_proba(list(body["inputs"][0]["data"]))
        out = {"name": "predict_proba", "shape": list(proba.shape), "datatype": "FP64",
               "data": proba.ravel().tolist()}
        return web.Response(body=orjson.dumps({"model_name": TEXT_MODEL, "outputs": [out]}),
                            content_type="application/json")

    app.router.add_post(f"/v2/models/{TEXT_MODEL}/infer", infer)


def fit_text_demo_profile(model: TicketModel, directory: Path) -> None:
    from detectors import save_profile
    from detectors.text import fit_text_profile

    profile, _ = fit_text_profile(model.train, labels=np.asarray(model.y_train), n_components=16, seed=0)
    save_profile(profile, directory, force=True)


async def text_traffic(http: aiohttp.ClientSession, url: str, model: TicketModel,
                       key: Callable[[str, str], str]) -> None:
    """Benign tickets, tickets with zero-width characters, and a character-edit attack (in a thread: the attack
    client is synchronous)."""
    from guard_agent.attacks import TextClient, char_swap, text_body

    async def send(texts: list[str], k: str) -> int:
        headers = {"X-API-Key": k, "Content-Type": "application/json", "X-Request-Id": f"demo-{k}"}
        async with http.post(f"{url}/v2/models/{TEXT_MODEL}/infer", data=text_body(texts), headers=headers) as r:
            await r.read()
            return r.status

    for i in range(3):
        k = key(f"tickets{i}", "benign client: support tickets (text)")
        for text in model.test[i * 20:(i + 1) * 20]:
            await send([text], k)
    k = key("zerowidth", "tickets with zero-width characters (text)")
    for text in model.test[100:105]:
        await send([text.replace(" ", "\u200b ", 2)], k)
    k = key("textattack", "character-edit attack on tickets (text)")
    client = TextClient(url, [k], f"demo-{k}", model=TEXT_MODEL)
    try:
        await asyncio.to_thread(char_swap, client, model.test[120:123], budget=150)
    finally:
        client.close()


