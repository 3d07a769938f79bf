"""Genotype strings: round-trip, canonical ids, and errors that name what is wrong."""

from __future__ import annotations

import pytest

from search_spaces import Genotype, GenotypeError, UnknownNameError, get_space
from search_spaces.genotype import format_value, parse_value


@pytest.mark.parametrize(
    "value", [0, -3, 7, 0.5, -1e-07, 1e20, "sep_conv_3x3", (), (1, "a", (2.5, ("b",))), ((0, "x", 1, "y"),)]
)
def test_value_round_trip(value):
    assert parse_value(format_value(value)) == value


def test_genotype_round_trip_and_id():
    text = "darts@1|normal=((0,sep_conv_3x3,1,skip_connect),(2,max_pool_3x3,0,dil_conv_5x5))|w=0.5|k=-3"
    g = Genotype.from_str(text)
    assert g.to_str() == text
    assert Genotype.from_str(g.to_str()) == g
    assert hash(g) == hash(Genotype.from_str(text))
    assert len(g.id) == 12 and g.id == Genotype.from_str(text).id
    assert g.replace(w=0.25).id != g.id
    assert g["k"] == -3


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "nospace",
        "darts|x=1",
        "darts@1|x",
        "darts@1|x=(1,2",
        "darts@1|x=1|x=2",
        "darts@1|x=1)",
        "darts@1|x=$",
    ],
)
def test_malformed_strings_raise_genotype_error(bad):
    with pytest.raises(GenotypeError):
        Genotype.from_str(bad)


def test_unknown_space_names_the_valid_ones():
    with pytest.raises(UnknownNameError) as info:
        get_space("dart")
    msg = str(info.value)
    assert "'dart'" in msg and "darts" in msg and "nb201" in msg and "did you mean 'darts'" in msg


def test_space_rejects_genotype_of_another_space():
    g = get_space("nb201").sample(__import__("numpy").random.default_rng(0))
    with pytest.raises(GenotypeError, match="given to space 'darts'"):
        get_space("darts").validate(g)
