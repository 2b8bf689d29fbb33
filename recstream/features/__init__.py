"""Feature logic, pure: session state, popularity and co-occurrence, shared by streaming and batch."""
from recstream.features.plan import BatchPlan, Incoming, Limits, RedisOps, plan
from recstream.features.session import FeatureConfig, UserState, apply

__all__ = ["BatchPlan", "FeatureConfig", "Incoming", "Limits", "RedisOps", "UserState", "apply", "plan"]
