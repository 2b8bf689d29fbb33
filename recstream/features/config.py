"""Settings -> the plain values the pure feature core takes (the core never reads settings)."""
from __future__ import annotations

from recstream.features.plan import Limits
from recstream.features.session import FeatureConfig
from recstream.settings import Settings


def feature_config(s: Settings) -> FeatureConfig:
    return FeatureConfig(session_idle_timeout_s=s.session_idle_timeout_s, session_recent_max=s.session_recent_max,
                         covisit_window=s.covisit_window, weights=s.event_weights)


def limits(s: Settings) -> Limits:
    return Limits(session_ttl_s=s.session_idle_timeout_s, user_features_ttl_s=s.user_features_ttl_s,
                  window_days=s.popularity_window_days, trending_half_life_s=s.trending_half_life_s,
                  cooccurrence_max=s.cooccurrence_max_per_item)
