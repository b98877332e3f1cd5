"""1:N ranking: the grouped implementation gives what scoring each user's templates separately gives."""
import numpy as np
import pytest

from edge_mfr.errors import InputError
from edge_mfr.match import aggregate, cosine_scores, rank_users


@pytest.mark.parametrize("method", ["max", "mean"])
def test_rank_users_matches_per_user_aggregation(method):
    rng = np.random.default_rng(7)
    templates = rng.normal(size=(400, 32)).astype(np.float32)
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    users = [f"user{int(i)}" for i in rng.integers(0, 60, len(templates))]  # interleaved, uneven counts
    probe = templates[5]
    scores, names = cosine_scores(probe, templates), np.asarray(users)
    expected = sorted(((u, aggregate(scores[names == u], method)) for u in dict.fromkeys(users)),
                      key=lambda pair: pair[1], reverse=True)
    ranked = rank_users(probe, users, templates, method)
    assert [c.user for c in ranked] == [u for u, _ in expected]
    np.testing.assert_allclose([c.score for c in ranked], [s for _, s in expected], atol=1e-6)
    if method == "max":  # the probe is one of user5's templates
        assert ranked[0].user == users[5] and ranked[0].score == pytest.approx(1.0, abs=1e-6)


def test_rank_users_refuses_bad_input():
    with pytest.raises(InputError, match="aggregation"):
        rank_users(np.ones(4, np.float32) / 2, ["a"], np.ones((1, 4), np.float32) / 2, "median")
    with pytest.raises(InputError, match="one user name per template"):
        rank_users(np.ones(4, np.float32) / 2, ["a", "b"], np.ones((1, 4), np.float32) / 2)
    assert rank_users(np.ones(4, np.float32) / 2, [], np.empty((0, 4), np.float32)) == []


def test_route_rows_keep_unmasked_templates_for_unmasked_probes():
    from edge_mfr.match import route_rows

    flags = np.array([False, True, True, False])
    np.testing.assert_array_equal(route_rows(flags, "unmasked"), [True, False, False, True])
    np.testing.assert_array_equal(route_rows(flags, "masked"), [True, True, True, True])
    np.testing.assert_array_equal(route_rows(np.array([True, True]), "unmasked"), [True, True])  # nothing else
    with pytest.raises(InputError, match="route"):
        route_rows(flags, "sideways")


def test_route_rows_under_the_masked_templates_rule():
    """A two-network package's rule: a masked probe meets the masked templates, unless the user has none."""
    from edge_mfr.match import route_rows

    flags = np.array([False, True, True, False])
    np.testing.assert_array_equal(route_rows(flags, "masked", "masked"), [False, True, True, False])
    np.testing.assert_array_equal(route_rows(flags, "unmasked", "masked"), [True, False, False, True])
    np.testing.assert_array_equal(route_rows(np.array([False, False]), "masked", "masked"), [True, True])
    with pytest.raises(InputError, match="masked_probe_templates"):
        route_rows(flags, "masked", "clean")
