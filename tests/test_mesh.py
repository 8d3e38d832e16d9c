"""MeshSpec: construction, parsing of '8x8' strings, default names and the world-size check."""
import pytest

from autopar.core.errors import AutoparError, MeshError
from autopar.core.mesh import MeshSpec, default_dim_names, parse_mesh_shape


def test_make_from_string_and_sequence():
    m = MeshSpec.make("2x4")
    assert m.shape == (2, 4) and m.dim_names == ("dp", "tp") and m.ndim == 2 and m.size == 8
    assert MeshSpec.make([2, 4]) == m
    assert MeshSpec.make((8,)).dim_names == ("dp",)
    assert MeshSpec.make("2x2x2").dim_names == ("dp", "sp", "tp")
    assert MeshSpec.make("2x4", "a, b").dim_names == ("a", "b")
    assert MeshSpec.make((2, 4), ["x", "y"]).dim_names == ("x", "y")


@pytest.mark.parametrize("text,shape", [("8x8", (8, 8)), ("8X8", (8, 8)), ("(2,4)", (2, 4)), ("2,2,2", (2, 2, 2)),
                                        ("16", (16,))])
def test_parse_mesh_shape(text, shape):
    assert parse_mesh_shape(text) == shape


def test_default_dim_names():
    assert default_dim_names(4) == ("d0", "d1", "d2", "d3")


@pytest.mark.parametrize("text", ["axb", "0x2", "2x-1", "x", ""])
def test_parse_errors(text):
    with pytest.raises(MeshError, match="mesh"):
        parse_mesh_shape(text)


def test_construction_errors():
    with pytest.raises(MeshError, match="positive ints"):
        MeshSpec(shape=(), dim_names=())
    with pytest.raises(MeshError, match="positive ints"):
        MeshSpec(shape=(2, 0), dim_names=("a", "b"))
    with pytest.raises(MeshError, match="one name per dim"):
        MeshSpec.make((2, 4), ("dp",))
    with pytest.raises(MeshError, match="distinct"):
        MeshSpec.make((2, 4), ("dp", "dp"))


def test_world_size():
    m = MeshSpec.make("2x4")
    m.check_world_size(8)
    with pytest.raises(MeshError, match=r"mesh 2x4 needs 8 ranks but the process group has 4") as ei:
        m.check_world_size(4)
    assert isinstance(ei.value, AutoparError)
    assert "--nproc-per-node 8" in str(ei.value)


def test_frozen_and_hashable():
    m = MeshSpec.make("2x2")
    with pytest.raises(AttributeError):
        m.shape = (4,)  # type: ignore[misc]
    assert {m: 1}[MeshSpec.make((2, 2))] == 1
