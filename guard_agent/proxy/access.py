"""Access: credentials the policy requires and the models a credential may call."""

from __future__ import annotations

from aiohttp import web

from guard_agent.identity import Identity
from guard_agent.policy.model import EffectivePolicy
from guard_agent.proxy.outcome import Outcome, reject
from guard_agent.state import GuardState

__all__ = ["access_refusal"]


def access_refusal(state: GuardState, out: Outcome, identity: Identity, eff: EffectivePolicy,
                   request_id: str, *, model_required: bool, health: bool = False) -> web.Response | None:
    """401 without valid credentials when the policy requires them (on a plain ``health`` route only when it
    asks for that too); 403 for a model outside the credential's list (``model_required``: also when the route
    names no model). None when the request may go on."""
    if identity.credential_error is not None:
        out.fields["credential_error"] = identity.credential_error
    if identity.principal is not None:
        out.fields["principal"] = identity.principal
    if eff.credentials_required(health=health) and not identity.authenticated:
        out.rule = "credentials-required"
        return reject(state, out, 401, "unauthorized", "a valid API key or bearer token is required", request_id,
                      {"WWW-Authenticate": 'Bearer realm="inference-guard"'})
    if identity.models is not None and (model_required or out.model is not None) and out.model not in identity.models:
        out.rule = "model-not-allowed"
        return reject(state, out, 403, "model_not_allowed", "this credential may not call this model", request_id)
    return None
