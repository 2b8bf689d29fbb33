"""Schemas: the single source of truth for every record on every topic and HTTP body."""
from schemas.base import FieldError, Record, SchemaError
from schemas.catalogue import Product
from schemas.erasure import Erasure
from schemas.events import EVENT_TYPES, Event
from schemas.experiments import Exposure
from schemas.recommendations import KINDS, CandidateSet, Overrides, RecommendationReply, RecommendationRequest, RecommendedItem

__all__ = [
    "EVENT_TYPES", "KINDS", "CandidateSet", "Erasure", "Event", "Exposure", "FieldError", "Overrides", "Product",
    "RecommendationReply",
    "RecommendationRequest", "RecommendedItem", "Record", "SchemaError",
]
