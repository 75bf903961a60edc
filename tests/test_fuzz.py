"""Every parser of user input, fuzzed: each input parses, or is refused with the project's own
one-line error (a UserError), never another library's exception.

Inputs are drawn by hypothesis: structured YAML documents built from the real keys mixed with
junk, and raw text and bytes. `EXAMPLES` inputs per parser, derandomized so CI is repeatable;
`FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py` searches longer.
"""

from __future__ import annotations

import os
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.evolution.journal import Journal, format_header, parse_evolve_csv, run_columns
from orchestrator.evolution.search_space import SearchSpace
from orchestrator.runs.names import check_run_name
from orchestrator.runs.plan import parse_gpu_spec, parse_worker_key
from trainer.config import Hyp
from trainer.data.data_config import load_data_config
from trainer.data.labels import check_image
from trainer.errors import UserError
from trainer.model.yolo import load_model_spec, model_stride

pytestmark = pytest.mark.faults

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = list(Hyp.keys())
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=8)
RAW = st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200))  # file contents


def _document(keys: list[str]) -> st.SearchStrategy[Any]:
    """A YAML document: usually a mapping of real keys (and some junk ones) to any values."""
    mapping = st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), VALUES, max_size=len(keys) + 2)
    return st.one_of(mapping, VALUES)


def _yaml_file(content: Any, raw: bool = False) -> Path:
    handle = tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False)  # noqa: SIM115 - removed by the caller
    with handle:
        handle.write(content if raw else yaml.safe_dump(content, allow_unicode=True).encode())
    return Path(handle.name)


def _parses_or_refuses(parse: Callable[[], Any]) -> None:
    try:
        parse()
    except UserError as error:
        assert error.message and "\n" not in error.message.strip(), error.message


def _each_yaml(parse: Callable[[Path], Any], content: Any, raw: bool) -> None:
    path = _yaml_file(content, raw)
    try:
        _parses_or_refuses(lambda: parse(path))
    finally:
        path.unlink()


@FUZZ
@given(st.one_of(_document(KEYS).map(lambda doc: (doc, False)), RAW.map(lambda text: (text, True))))
def test_hyp_yaml(case: tuple[Any, bool]) -> None:
    _each_yaml(Hyp.from_yaml, *case)


@FUZZ
@given(st.one_of(_document(KEYS).map(lambda doc: (doc, False)), RAW.map(lambda text: (text, True))))
def test_search_space_yaml(case: tuple[Any, bool]) -> None:
    _each_yaml(SearchSpace.from_yaml, *case)


DATA_KEYS = ["path", "train", "val", "test", "names", "nc", "download"]


@FUZZ
@given(st.one_of(_document(DATA_KEYS).map(lambda doc: (doc, False)), RAW.map(lambda text: (text, True))))
def test_data_yaml(case: tuple[Any, bool]) -> None:
    _each_yaml(load_data_config, *case)


MODEL_KEYS = ["nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head"]


@FUZZ
@given(st.one_of(_document(MODEL_KEYS).map(lambda doc: (doc, False)), RAW.map(lambda text: (text, True))))
def test_model_yaml(case: tuple[Any, bool]) -> None:
    _each_yaml(load_model_spec, *case)
    _each_yaml(model_stride, *case)  # what --imgsz is rounded to, read from the same file


GPU_TEXT = st.text(alphabet=string.digits + ",- allALL\t", max_size=16) | st.text(max_size=12)


@FUZZ
@given(GPU_TEXT, st.one_of(st.none(), st.lists(st.integers(0, 16), max_size=8, unique=True)))
def test_gpu_spec(spec: str, available: list[int] | None) -> None:
    _parses_or_refuses(lambda: parse_gpu_spec(spec, available))


@FUZZ
@given(st.text(max_size=40) | st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,30}", fullmatch=True))
def test_run_names_and_worker_keys(text: str) -> None:
    _parses_or_refuses(lambda: check_run_name(text))
    _parses_or_refuses(lambda: parse_worker_key(text))


HEADER = format_header(run_columns(Hyp()))
CELL = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(lambda value: f"{value:20.5g}"),
                 st.text(alphabet=string.printable, max_size=22))
CSV_LINE = st.lists(CELL, min_size=0, max_size=len(run_columns(Hyp())) + 9).map(",".join)


@FUZZ
@given(st.lists(CSV_LINE, max_size=8), st.booleans(), st.binary(max_size=60))
def test_evolve_csv(lines: list[str], keep_header: bool, tail: bytes) -> None:
    body = "".join(line + "\n" for line in lines).encode()
    data = (HEADER if keep_header else b"") + body + tail
    population = None
    try:
        population = parse_evolve_csv(data, "evolve.csv")
    except UserError as error:
        assert not keep_header and "not an evolve.csv" in error.message
    if population is not None:  # every line is a row or a damaged line, in place
        assert len(population) == data[: data.rfind(b"\n") + 1].count(b"\n") - 1
        assert np.isnan(population.results[[row.line - 2 for row in population.damaged]]).all()


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40), VALUES.map(yaml.safe_dump)), max_size=6), st.binary(max_size=40))
def test_evolve_meta_lines(lines: list[str], tail: bytes) -> None:
    run_dir = Path(tempfile.mkdtemp())
    (run_dir / "evolve_meta.jsonl").write_bytes("".join(line.replace("\n", " ") + "\n" for line in lines).encode()
                                                + tail)
    records = Journal(run_dir).read_records()
    assert all(isinstance(record, dict) for record in records)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("labels")
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    Image.new("RGB", (32, 24), (90, 120, 30)).save(folder / "images" / "a.jpg")
    return folder


LABEL_LINE = st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.integers(-3, 9).map(str),
                                st.text(alphabet=string.printable, max_size=6)), max_size=9).map(" ".join)


@FUZZ
@given(st.one_of(st.lists(LABEL_LINE, max_size=5).map("\n".join), RAW))
def test_label_files(image_folder: Path, text: str | bytes) -> None:
    """A bad label file makes its image `corrupt` with a message, as YOLOv5 does; it never raises."""
    (image_folder / "labels" / "a.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    status, sample, warning = check_image(image_folder / "images" / "a.jpg", nc=4)
    assert status in ("found", "empty", "corrupt")
    assert (sample is None) == (status == "corrupt") and (status != "corrupt" or warning)
