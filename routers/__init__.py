"""Turnout's routing library: the Router protocol, routing policies and their registry.

Importable without FastAPI or the gateway: `routers` never imports `server`.
"""

from routers.base import CandidateScore, Router, RoutingDecision, RoutingOutcome, RoutingRequest

__all__ = ["CandidateScore", "Router", "RoutingDecision", "RoutingOutcome", "RoutingRequest"]
