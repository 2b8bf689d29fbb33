"""Schemas: the single source of truth for every record on every topic and HTTP body."""
from schemas.base import FieldError, Record, SchemaError
from schemas.catalogue import Product
from schemas.events import EVENT_TYPES, Event
from schemas.recommendations import KINDS, CandidateSet, RecommendationReply, RecommendationRequest, RecommendedItem

__all__ = [
    "EVENT_TYPES", "KINDS", "CandidateSet", "Event", "FieldError", "Product", "RecommendationReply",
    "RecommendationRequest", "RecommendedItem", "Record", "SchemaError",
]
