"""``Remaining`` behaves as the set of (provider, key) it replaced."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from harvester.tracking import Remaining

ops = st.lists(
    st.tuples(st.booleans(), st.sampled_from(["playment", "cognite"]), st.sampled_from("abcd")),
    max_size=40,
)


@given(ops)
def test_matches_a_set_of_tuples(steps: list[tuple[bool, str, str]]) -> None:
    model: set[tuple[str, str]] = set()
    remaining = Remaining()
    for add, provider, key in steps:
        if add:
            model.add((provider, key))
            remaining.add((provider, key))
        else:
            model.discard((provider, key))
            remaining.discard((provider, key))
        assert len(remaining) == len(model)
        assert bool(remaining) == bool(model)
        assert set(remaining) == model
        assert all(item in remaining for item in model)
        assert ("playment", "zz") not in remaining
        assert remaining.count("playment") == sum(1 for p, _ in model if p == "playment")


def test_foreign_items_are_not_members() -> None:
    remaining = Remaining()
    remaining.add(("playment", "a"))
    assert "playment" not in remaining
    assert ("playment", "a", "x") not in remaining
    assert ("playment", "a") in remaining
