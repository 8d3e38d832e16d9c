"""The one printer/parser pair for placements: round trips and the errors it raises."""
import pytest
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.core.errors import PlanFormatError
from autopar.core.placement import (format_placement, format_sharding, parse_placement, parse_sharding,
                               sharding_str)

CASES = [(Shard(0), "S(0)"), (Shard(3), "S(3)"), (Shard(-1), "S(-1)"), (Replicate(), "R"),
         (Partial("sum"), "P(sum)"), (Partial("avg"), "P(avg)"), (Partial("max"), "P(max)"),
         (Partial("min"), "P(min)")]


@pytest.mark.parametrize("placement,text", CASES, ids=[t for _, t in CASES])
def test_round_trip(placement, text):
    assert format_placement(placement) == text
    assert parse_placement(text) == placement
    assert format_placement(parse_placement(text)) == text


def test_sharding_round_trip():
    sh = (Shard(0), Replicate(), Partial("sum"))
    assert format_sharding(sh) == ["S(0)", "R", "P(sum)"]
    assert parse_sharding(format_sharding(sh)) == sh
    assert parse_sharding(("S(1)", "R")) == (Shard(1), Replicate())
    assert parse_sharding([]) == ()
    assert sharding_str(sh) == "S(0)·R·P(sum)"


def test_parse_strips_whitespace():
    assert parse_placement("  S(2) ") == Shard(2)


@pytest.mark.parametrize("text", ["", "X", "r", "S", "S()", "S(a)", "S(1.5)", "Shard(0)", "P(prod)", "P()",
                                  "P(sum", "RR"])
def test_bad_placement(text):
    with pytest.raises(PlanFormatError, match="is not a placement"):
        parse_placement(text)


def test_bad_placement_names_field():
    with pytest.raises(PlanFormatError, match=r"plan\.param_placements\['w'\]"):
        parse_placement("Q", field="plan.param_placements['w']")


def test_bad_sharding_names_index():
    with pytest.raises(PlanFormatError, match=r"sh\[1\]: 'S\(x\)'"):
        parse_sharding(["R", "S(x)"], field="sh")
    with pytest.raises(PlanFormatError, match=r"sh\[0\]: expected a string"):
        parse_sharding([0], field="sh")
    with pytest.raises(PlanFormatError, match="expected a list of placements"):
        parse_sharding("S(0)", field="sh")


def test_unprintable_placement():
    class Odd(Placement):
        pass

    with pytest.raises(PlanFormatError, match="cannot print placement"):
        format_placement(Odd())
