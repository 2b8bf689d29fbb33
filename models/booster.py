"""The ranker's booster at serve time: loaded from its saved bytes, scoring feature rows."""
from __future__ import annotations

import numpy as np
import xgboost as xgb


def load(model: bytes, nthread: int) -> xgb.Booster:
    booster = xgb.Booster(model_file=bytearray(model))
    booster.set_param({"nthread": nthread})
    return booster


def score(booster: xgb.Booster, X: np.ndarray) -> np.ndarray:
    """Ranker scores for rows of recstream.ranking.matrix (inplace_predict: no DMatrix copy)."""
    return np.asarray(booster.inplace_predict(X), np.float64)
