import pytest

from models.registry import decide


@pytest.mark.parametrize("new, champion, promote, says", [
    ({"ndcg": 0.30}, None, True, "no champion yet"),
    ({"ndcg": 0.30}, {"ndcg": 0.30}, True, ">="),
    ({"ndcg": 0.295}, {"ndcg": 0.30}, True, ">="),       # within the 2% margin
    ({"ndcg": 0.29}, {"ndcg": 0.30}, False, "<"),        # worse by more than 2%
    ({"recall": 0.5}, {"ndcg": 0.30}, False, "has no ndcg"),
    ({"ndcg": 0.1}, {"recall": 0.3}, True, "no champion yet"),
])
def test_promotion_rule(new, champion, promote, says):
    d = decide(new, champion, "ndcg", 0.02)
    assert d.promote is promote and says in d.reason


def test_a_champion_trained_on_other_features_gives_way_whatever_its_metric():
    d = decide({"ndcg": 0.10}, {"ndcg": 0.30}, "ndcg", 0.02, same_features=False)
    assert d.promote and "other ranker features" in d.reason
    assert not decide({"ndcg": 0.10}, {"ndcg": 0.30}, "ndcg", 0.02, same_features=True).promote
