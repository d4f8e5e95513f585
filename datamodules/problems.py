"""GSM8K, MATH and synthetic toy_arithmetic problems, loaded through `datasets` into one record type (`Problem`).

A `DatasetSource` names where the problems come from: the small test split shipped with the project
("embedded": GSM8K test, MATH-500; for toy_arithmetic, its generated train / test splits, see
interp/toy_arithmetic.py), a local .jsonl/.json file, or a hub id (e.g. openai/gsm8k with subset "main",
HuggingFaceH4/MATH-500). Every path goes through `datasets.load_dataset`; local files are
first checked line by line so that a broken file fails with "path:LINE: what is wrong" instead of a
pyarrow traceback.

Field formats accepted:
    gsm8k: question, answer ("<worked solution with <<calc>> notes>\\n#### <final answer>")
    toy_arithmetic: as gsm8k
    math:  problem, solution, and optionally answer (else: the solution's last \\boxed{}, interp.grading.last_boxed),
           subject or type, level (1..5, "Level 3", "Level ?"), unique_id (else "math/<split>/<row>")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from interp.errors import UserError
from interp.grading import DATASETS, last_boxed  # DATASETS order = the "dataset" label encoding
from interp.toy_arithmetic import SPLIT_SIZES as TOY_SPLITS
from interp.toy_arithmetic import toy_rows

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_FILES = {"gsm8k": EMBEDDED_DIR / "gsm8k_test.jsonl", "math": EMBEDDED_DIR / "math500.jsonl"}
REQUIRED_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"),
                   "toy_arithmetic": ("question", "answer")}  # fmt: skip
_LOCAL_SUFFIXES = (".jsonl", ".json")


@dataclass
class DatasetSource:
    """One set of problems: which benchmark, where it is stored, which split, how many."""

    name: str = "gsm8k"
    """Benchmark format: gsm8k | math | toy_arithmetic (synthetic 1-3 step problems, interp.toy_arithmetic)."""
    path: str = "embedded"
    """"embedded" (the test split shipped with the project: GSM8K test, MATH-500; toy_arithmetic: generated,
    splits train and test), a local .jsonl/.json file,
    or a hub dataset id (e.g. openai/gsm8k, HuggingFaceH4/MATH-500)."""
    split: str = "test"
    """Split to load from a hub id; for files it only names the problems (ids like gsm8k/<split>/<row>)."""
    subset: str | None = None
    """Hub config name (e.g. "main" for openai/gsm8k); ignored for files."""
    limit: int | None = None
    """Sample this many problems (seeded, kept in file order); None = all."""

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise UserError(f"source.name {self.name!r} is not one of {list(DATASETS)}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"source.limit must be >= 1 or null, got {self.limit}")
        if self.generated:
            if self.split not in TOY_SPLITS:
                raise UserError(f"source.split {self.split!r}: toy_arithmetic has the splits {sorted(TOY_SPLITS)}")
        elif self.path == "embedded":
            if self.split != "test":
                raise UserError(f"source.split {self.split!r}: the embedded {self.name} has only the test split")
        elif self.is_local:
            if not Path(self.path).expanduser().is_file():
                raise UserError(f"source.path {self.path!r} does not exist")
            if not self.path.endswith(_LOCAL_SUFFIXES):
                raise UserError(f"source.path {self.path!r}: local files must be .jsonl or .json")

    @property
    def generated(self) -> bool:
        """True for toy_arithmetic's "embedded" splits: generated in memory, there is no file."""
        return self.name == "toy_arithmetic" and self.path == "embedded"

    @property
    def is_local(self) -> bool:
        """True for "embedded" and local files; False for hub ids."""
        if self.path == "embedded" or Path(self.path).expanduser().is_file():
            return True
        return self.path.startswith((".", "/", "~")) or self.path.endswith(_LOCAL_SUFFIXES)

    def local_file(self) -> Path:
        """The file to read ("embedded" resolves to the shipped copy)."""
        return EMBEDDED_FILES[self.name] if self.path == "embedded" else Path(self.path).expanduser()


@dataclass(frozen=True)
class Problem:
    """One benchmark problem with its reference answer."""

    problem_id: str  # stable and unique: "gsm8k/test/17", or MATH's unique_id "test/algebra/1.json"
    dataset: str  # "gsm8k" | "math" | "toy_arithmetic"
    question: str
    gold_answer: str  # GSM8K: after "####", commas removed; MATH: `answer` (else the solution's last \boxed{}), stripped
    gold_solution: str  # GSM8K: rationale without <<calc>> notes and the "####" line; MATH: the solution
    subject: str | None  # MATH subject ("Algebra", ...); None for GSM8K
    level: int | None  # MATH level 1..5; None for GSM8K or unknown


# ---------------------------------------------------------------------------------------------- parsing


def parse_gsm8k_answer(answer: str) -> tuple[str, str] | None:
    """GSM8K `answer` text -> (final answer, rationale), or None when there is no "####" line.

    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\\n#### 1,018" -> ("1018", "Janet sells 16 - 3 - 4 = 9 duck eggs.")
    """
    if "####" not in answer:
        return None
    rationale, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        return None
    return final, re.sub(r"<<[^>]*>>", "", rationale).strip()


def parse_level(value) -> int | None:
    """MATH level: 3, "3" or "Level 3" -> 3; None, "", "Level ?" -> None. Raises ValueError otherwise."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower().startswith("level"):
        text = text[len("level") :].strip()
    if text in ("", "?"):
        return None
    if text.isdigit() and 1 <= int(text) <= 5:
        return int(text)
    raise ValueError(f"level {value!r} is not 1..5, 'Level N' or 'Level ?'")


def _field(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        state = "missing" if value is None else "empty" if isinstance(value, str) else f"not text ({value!r:.40})"
        raise ValueError(f"field {name!r} is {state}")
    return value


def row_to_problem(dataset: str, row: dict, split: str, index: int) -> Problem:
    """One raw row -> Problem. Raises ValueError (one line, naming the field) for a malformed row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if dataset in ("gsm8k", "toy_arithmetic"):
        question, answer = _field(row, "question"), _field(row, "answer")
        parsed = parse_gsm8k_answer(answer)
        if parsed is None:
            raise ValueError("field 'answer' has no '#### <final answer>' line")
        gold, rationale = parsed
        return Problem(f"{dataset}/{split}/{index}", dataset, question, gold, rationale, None, None)
    question, solution = _field(row, "problem"), _field(row, "solution")
    gold = row.get("answer")
    if not isinstance(gold, str) or not gold.strip():
        gold = last_boxed(solution)  # the same rule MATH's own derived `answer` fields follow
        if gold is None:
            raise ValueError("no field 'answer' and no \\boxed{} answer in field 'solution'")
    subject = row.get("subject", row.get("type"))
    unique_id = row.get("unique_id")
    return Problem(
        problem_id=unique_id if isinstance(unique_id, str) and unique_id else f"math/{split}/{index}",
        dataset="math", question=question, gold_answer=gold.strip(), gold_solution=solution,
        subject=subject if isinstance(subject, str) and subject else None, level=parse_level(row.get("level")),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- loading


def _json_rows_with_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) for every row of a JSON-lines file or a JSON array file.

    Raises UserError("path:LINE: ...") for an empty file or text that is not JSON.
    """
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{path}:1: the file is empty (expected one JSON object per line)")
    if text.lstrip().startswith("["):  # one JSON array (.json): find where each element starts
        decoder, rows = json.JSONDecoder(), []
        pos = text.index("[") + 1
        while True:
            pos = len(text) - len(text[pos:].lstrip())
            if text.startswith("]", pos):
                break
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
            rows.append((text.count("\n", 0, pos) + 1, value))
            pos = len(text) - len(text[end:].lstrip())
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                line = text.count("\n", 0, pos) + 1
                raise UserError(f"{path}:{line}: not valid JSON (expected ',' or ']' between array elements)")
        if not rows:
            raise UserError(f"{path}:1: the JSON array is empty")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # `datasets` skips blank lines too
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def validate_local_file(path: Path, dataset: str, split: str) -> int:
    """Check every row of a local file before `datasets` reads it; returns the row count.

    Raises UserError("path:LINE: what is wrong") for an empty file, a line that is not JSON, a row that is
    not an object, or a row missing a required field (or with an unparseable answer or level).
    """
    rows = _json_rows_with_lines(path)
    for index, (number, row) in enumerate(rows):
        try:
            row_to_problem(dataset, row, split, index)
        except ValueError as err:
            raise UserError(f"{path}:{number}: {err}") from None
    return len(rows)


def _load_rows(source: DatasetSource):
    """The source as a `datasets.Dataset` (local files are validated first)."""
    import datasets

    if source.generated:
        return datasets.Dataset.from_list(toy_rows(source.split))  # generated: deterministic, nothing stored
    if source.is_local:
        path = source.local_file()
        validate_local_file(path, source.name, source.split)
        bars_were_off = datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # "Generating train split" for a local file is noise, not progress
        try:
            return datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # e.g. a field whose type changes between rows
            raise UserError(f"{path}: `datasets` cannot read it: {str(err).splitlines()[0]}") from err
        finally:
            if not bars_were_off:
                datasets.enable_progress_bars()
    try:
        return datasets.load_dataset(source.path, source.subset, split=source.split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load dataset {source.path!r} (subset {source.subset!r}, split "
                        f"{source.split!r}): {message}") from err  # fmt: skip


def load_problems(source: DatasetSource, seed: int = 0) -> list[Problem]:
    """All problems of one source (or a seeded sample of `source.limit` of them, in file order).

    Problem ids use the row index in the full file/split, so a sample's ids do not depend on the limit.
    """
    rows = _load_rows(source)
    where = str(source.local_file()) if source.is_local and not source.generated else f"{source.path}[{source.split}]"
    missing = [f for f in REQUIRED_FIELDS[source.name] if f not in rows.column_names]
    if missing:
        raise UserError(f"{where}: rows have no field {missing[0]!r} (fields: {rows.column_names}); "
                        f"is it a {source.name} dataset?")  # fmt: skip
    indices = np.arange(len(rows))
    if source.limit is not None and source.limit < len(rows):
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(len(rows), size=source.limit, replace=False))
    problems = []
    for index, row in zip(indices.tolist(), rows.select(indices).to_list()):
        try:
            problems.append(row_to_problem(source.name, row, source.split, index))
        except ValueError as err:
            raise UserError(f"{where}: row {index}: {err}") from None
    return problems


def load_sources(sources: list[DatasetSource], seed: int = 0) -> list[Problem]:
    """The problems of several sources, concatenated in order; raises UserError on a repeated problem id
    (e.g. MATH-500 and the full MATH test split hold the same problems under the same unique_id)."""
    problems = [p for source in sources for p in load_problems(source, seed)]
    seen: set[str] = set()
    for problem in problems:
        if problem.problem_id in seen:
            raise UserError(f"problem {problem.problem_id!r} appears twice; sources overlap or ids repeat")
        seen.add(problem.problem_id)
    return problems
