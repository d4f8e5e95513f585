"""Synthetic GSM8K-style arithmetic word problems with a known answer, for the toy reasoning pair.

A problem is a start quantity and 1-3 steps, each adding or taking away a number:
    "Mia has 3 marbles. She finds 4 more. Then she gives away 2. How many marbles does Mia have now?"
Questions spell numbers out ("seven"); solutions use digits. Every quantity (start, operands, every intermediate result and the answer) is a whole number in 1..9, so each
number is one token of the Qwen2.5 BPE (it splits digits) and an arithmetic step is one lookup. The wording
varies (names, objects, openers, verbs, connectives, questions), the arithmetic does not leave 1..9.

Splits are by computation: a problem belongs to the test split when its computation (start, steps) hashes into
the held-out tenth, so test problems ask computations no training problem asks, in any wording.

`worked_solution` is the step-by-step text a solver writes (it restates each step, then "a op b = c");
`control_output` is what the control tasks (copy / restate / topic) ask for. Plain Python: no torch.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

VALUES = range(1, 10)  # every quantity that appears, answers included
MAX_STEPS = 3
TEST_BUCKETS = 10  # 1 in TEST_BUCKETS computations is held out

NAMES = (("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"), ("Sam", "he"),
         ("Lily", "she"), ("Ben", "he"), ("Nina", "she"), ("Omar", "he"), ("Ruby", "she"), ("Max", "he"))  # fmt: skip
OBJECTS = ("apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards", "stamps", "balloons",
           "cookies", "toy cars")  # fmt: skip
OPENERS = ("{name} has {n} {obj}.", "{name} starts with {n} {obj}.", "{name} had {n} {obj} in a box.",
           "There are {n} {obj} in {name}'s bag.")  # fmt: skip
ADD_VERBS = ("buys {n} more", "finds {n} more", "gets {n} more from a friend", "is given {n} more")
SUB_VERBS = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")
# Connectives by step: the second step opens with one of CONNECTIVES[0], the third with one of CONNECTIVES[1].
CONNECTIVES = (("Then {p}", "Next, {p}"), ("After that, {p}", "Finally, {p}"))
QUESTIONS = ("How many {obj} does {name} have now?", "How many {obj} does {name} have at the end?",
             "What is the number of {obj} {name} has now?")  # fmt: skip
OPS = {"+": ADD_VERBS, "-": SUB_VERBS}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ToyProblem:
    """One problem: its computation and the wording choices (indices into the phrase tables above)."""

    start: int
    steps: tuple[tuple[str, int], ...]  # ((op, operand), ...), op "+" or "-"
    name: int
    obj: int
    opener: int
    verbs: tuple[int, ...]  # one per step
    connectives: tuple[int, ...]  # one per step after the first
    question_form: int

    def values(self) -> list[int]:
        """The running total after the start and after every step; the last one is the answer."""
        out = [self.start]
        for op, n in self.steps:
            out.append(out[-1] + n if op == "+" else out[-1] - n)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def computation(self) -> tuple:
        return (self.start, self.steps)


def computation_split(computation: tuple) -> str:
    """ "test" for the held-out tenth of computations (a stable hash), else "train"."""
    digest = hashlib.sha256(repr(computation).encode()).digest()
    return "test" if digest[0] % TEST_BUCKETS == 0 else "train"


def _step_sentence(problem: ToyProblem, k: int, shift: int = 0) -> str:
    op, n = problem.steps[k]
    verbs = OPS[op]
    verb = verbs[(problem.verbs[k] + shift) % len(verbs)].format(n=_number(n, shift))
    pronoun = NAMES[problem.name][1]
    if k == 0:
        return f"{pronoun.capitalize()} {verb}."
    choices = CONNECTIVES[k - 1]
    connective = choices[(problem.connectives[k - 1] + shift) % len(choices)].format(p=pronoun)
    return f"{connective} {verb}."


def _number(n: int, shift: int) -> str:
    """Questions spell numbers out ("seven"); the restatement (shift != 0) and the solution use digits."""
    return str(n) if shift else NUMBER_WORDS[n]


def question_text(problem: ToyProblem, shift: int = 0) -> str:
    """The problem as a user would ask it. `shift` rotates every wording choice (used by the restate control)."""
    name, obj = NAMES[problem.name][0], OBJECTS[problem.obj]
    opener = OPENERS[(problem.opener + shift) % len(OPENERS)].format(
        name=name, n=_number(problem.start, shift), obj=obj
    )
    steps = [_step_sentence(problem, k, shift) for k in range(len(problem.steps))]
    question = QUESTIONS[(problem.question_form + shift) % len(QUESTIONS)].format(obj=obj, name=name)
    return " ".join([opener, *steps, question])


def worked_solution(problem: ToyProblem) -> str:
    """The reasoning: the start, then one line per step that quotes the step and computes it
    ("Then she loses two, so 7 - 2 = 5.")."""
    name, obj = NAMES[problem.name][0], OBJECTS[problem.obj]
    values = problem.values()
    lines = [f"{name} starts with {problem.start} {obj}."]
    for k, (op, n) in enumerate(problem.steps):
        lines.append(f"{_step_sentence(problem, k)[:-1]}, so {values[k]} {op} {n} = {values[k + 1]}.")
    return "\n".join(lines)


def control_output(problem: ToyProblem, control: str) -> str:
    """What a model asked for the control task should answer (never the solution)."""
    if control == "copy":
        return question_text(problem)
    if control == "restate":
        return "In other words: " + question_text(problem, shift=1)
    if control == "topic":
        ops = {op for op, _ in problem.steps}
        kind = "Addition and subtraction" if len(ops) == 2 else "Addition" if "+" in ops else "Subtraction"
        return f"{kind} with {OBJECTS[problem.obj]}."
    raise ValueError(f"unknown control {control!r}")


def _distinct_verbs(rng: random.Random, ops: list[str]) -> tuple[int, ...]:
    """A verb index per step, never the same verb twice in one problem (a repeated verb makes "which step is
    this" ambiguous for a reader, and for a small model copying operands)."""
    free = {op: rng.sample(range(len(verbs)), len(verbs)) for op, verbs in OPS.items()}
    return tuple(free[op].pop() for op in ops)


def _random_problem(rng: random.Random) -> ToyProblem:
    start = total = rng.choice(VALUES)
    steps = []
    for _ in range(rng.randint(1, MAX_STEPS)):  # every total in 1..9 has at least one step that stays in 1..9
        op, n = rng.choice(
            [(op, n) for op in OPS for n in VALUES if (total + n if op == "+" else total - n) in VALUES]
        )
        steps.append((op, n))
        total = total + n if op == "+" else total - n
    return ToyProblem(
        start=start,
        steps=tuple(steps),
        name=rng.randrange(len(NAMES)),
        obj=rng.randrange(len(OBJECTS)),
        opener=rng.randrange(len(OPENERS)),
        verbs=_distinct_verbs(rng, [op for op, _ in steps]),
        connectives=tuple(rng.randrange(len(CONNECTIVES[k])) for k in range(len(steps) - 1)),
        question_form=rng.randrange(len(QUESTIONS)),
    )


def toy_problems(split: str, n: int, seed: int = 0) -> list[ToyProblem]:
    """`n` distinct problems of one split ("train" | "test"), deterministic in (split, n, seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"toy_arithmetic has splits 'train' and 'test', not {split!r}")
    rng = random.Random(f"toy_arithmetic/{split}/{seed}")
    out: list[ToyProblem] = []
    seen: set[ToyProblem] = set()
    while len(out) < n:
        problem = _random_problem(rng)
        if computation_split(problem.computation) == split and problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


SPLIT_SIZES = {"train": 20000, "test": 1000}


def toy_rows(split: str) -> list[dict]:
    """The split as GSM8K-format rows ({"question", "answer": "<worked solution>\\n#### <n>"}), plus "steps"."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"toy_arithmetic has splits {sorted(SPLIT_SIZES)}, not {split!r}")
    return [{"question": question_text(p), "answer": f"{worked_solution(p)}\n#### {p.answer}", "steps": len(p.steps)}
            for p in toy_problems(split, SPLIT_SIZES[split])]  # fmt: skip
