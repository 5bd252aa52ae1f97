"""Parquet datasets on a real `pruneaudit api` process: the digits evaluation split uploaded as Parquet (under a
name that does not say so) is stored as the same dataset as its CSV, and a Parquet file with a column that is not
plain data is a 422 problem that keeps nothing."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.stack import assert_problem, start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("parquet"), with_worker=False)
    yield stack
    stack.stop()


def digits_columns(digits_case) -> dict:
    columns = {f"p{i}": digits_case.x[:, i].astype("float64") for i in range(digits_case.x.shape[1])}
    return {**columns, "digit": digits_case.y.astype("int64"), "band": (digits_case.y % 3).astype("int64")}


def as_parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def as_csv(columns: dict) -> bytes:
    rows = zip(*columns.values(), strict=True)
    return ("\n".join([",".join(columns), *(",".join(repr(v.item()) for v in row) for row in rows)]) + "\n").encode()


def test_parquet_is_stored_as_the_same_dataset_as_its_csv(stack, digits_case):
    columns = digits_columns(digits_case)
    form = {"label": "digit", "groups": "band"}
    with stack.client() as client:
        from_parquet = digits_case.upload_dataset(client, as_parquet(pa.table(columns)), "upload.dat", **form)
        from_csv = digits_case.upload_dataset(client, as_csv(columns), "upload.csv", **form)
    assert from_parquet.status_code == 201, from_parquet.text
    assert from_csv.status_code == 201, from_csv.text
    parquet_ds, csv_ds = from_parquet.json(), from_csv.json()
    assert parquet_ds["format"] == "parquet" and csv_ds["format"] == "csv"
    for field in ("rows", "feature_shape", "classes", "groups"):
        assert parquet_ds[field] == csv_ds[field], field
    assert parquet_ds["feature_shape"] == [64] and parquet_ds["rows"] == len(digits_case.y)


def test_a_column_that_is_not_plain_data_is_a_422_that_keeps_nothing(stack, digits_case):
    table = pa.table({**digits_columns(digits_case), "p0": pa.array([[1.0]] * len(digits_case.y))})
    with stack.client() as client:
        before = client.get("/v1/datasets").json()["total"]
        refused = digits_case.upload_dataset(client, as_parquet(table), "nested.parquet", label="digit", groups="band")
        assert_problem(refused, 422, "'p0' has type list")
        assert client.get("/v1/datasets").json()["total"] == before
