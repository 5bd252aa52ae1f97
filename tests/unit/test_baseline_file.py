"""The baseline file codec round-trips a tree of nested frozen dataclasses, containers and arrays exactly (dtype
and shape included), never pickles, and refuses what it cannot store as data."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from worker.engine.errors import EngineError
from worker.pipeline.baseline_file import read_tree, write_tree


@dataclass(frozen=True)
class Curvature:
    trace: np.ndarray
    converged: np.ndarray
    examples: np.ndarray


@dataclass(frozen=True)
class Diagnostics:
    gradient_norms: list[np.ndarray] | None
    curvature: list[Curvature] | None
    note: str | None = None
    counts: tuple[int, ...] = ()
    derived: int = field(init=False, default=7)  # not an init field: recomputed, not stored


@dataclass(frozen=True)
class Tree:
    diagnostics: Diagnostics
    cost: dict
    with_curvature: bool
    notes: dict[str, str]
    empty: Diagnostics | None


def assert_same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name))
    else:
        assert a == b or (a != a and b != b)  # NaN == NaN for this purpose


def test_a_tree_of_nested_dataclasses_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    curvature = Curvature(
        trace=rng.normal(size=4),
        converged=np.array([True, False, True, True]),
        examples=np.arange(4, dtype=np.int64),
    )
    tree = Tree(
        diagnostics=Diagnostics(
            gradient_norms=[rng.normal(size=3).astype(np.float32), np.array([np.nan, 1.0])],
            curvature=[curvature, Curvature(np.zeros((2, 3)), np.zeros(0, dtype=bool), np.ones(1, dtype=np.int32))],
            note="capped",
            counts=(3, 4),
        ),
        cost={"parameters": 10, "macs": 2.5, "nested": {"list": [1, 2.0, None, True]}, "scalar": np.float64(0.25)},
        with_curvature=True,
        notes={"curvature": "off"},
        empty=None,
    )
    path = tmp_path / "baseline.npz"
    write_tree(path, tree)
    loaded = read_tree(path, trusted=("tests",))
    assert_same(tree, loaded)
    assert type(loaded.cost["scalar"]) is np.float64 and loaded.diagnostics.counts == (3, 4)
    np.load(path, allow_pickle=False)  # readable without pickle
    assert not list(tmp_path.glob(".*partial"))


def test_the_real_baseline_types_round_trip(tmp_path):
    from worker.engine.curvature import GroupCurvature
    from worker.engine.gauss_newton import GroupGaussNewton
    from worker.engine.outcomes import Outcomes
    from worker.pipeline.diagnose import ModelDiagnostics

    outcomes = Outcomes(
        pred=np.array([0, 1]), correct=np.array([True, False]), loss=np.array([0.1, 2.0]), num_classes=2
    )
    curvature = GroupCurvature(
        trace=np.array([1.0, 2.0]),
        trace_se=np.array([0.1, 0.0]),
        trace_probes=np.array([6, 16]),
        top_eigenvalue=np.array([3.0, 4.0]),
        top_eigenvalue_error=np.array([1e-3, np.inf]),
        eigenvalue_converged=np.array([True, False]),
        examples_used=np.array([2, 0]),
        counts=np.array([2, 0]),
    )
    gauss_newton = GroupGaussNewton(
        trace=np.array([5.0, 0.0]), trace_se=np.array([0.5, 0.0]), examples_used=np.array([2, 0])
    )
    tree = {
        "dense": outcomes,
        "diagnostics": ModelDiagnostics([np.array([1.0, 2.0])], [curvature], [gauss_newton]),
    }
    write_tree(tmp_path / "b.npz", tree)
    assert_same(tree, read_tree(tmp_path / "b.npz"))


@pytest.mark.parametrize(
    "value, message",
    [(np.array([object()]), "Python objects"), ({1: "x"}, "non-str keys"), ({"s": {1, 2}}, "cannot store a set")],
)
def test_what_is_not_data_is_refused(tmp_path, value, message):
    with pytest.raises(EngineError, match=message):
        write_tree(tmp_path / "x.npz", value)


def test_a_file_naming_a_class_outside_the_project_is_refused(tmp_path):
    import json

    structure = {"t": "dataclass", "type": "subprocess:Popen", "fields": {}}
    np.savez(tmp_path / "evil.npz", __structure__=np.frombuffer(json.dumps(structure).encode(), dtype=np.uint8))
    with pytest.raises(EngineError, match="refusing"):
        read_tree(tmp_path / "evil.npz")
