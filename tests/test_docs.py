"""Every command README.md and docs/ show is one a test runs, so that the docs cannot drift
from what is tested: each command's entry point (`tune_main.py`, `-m genre_ray.predict`,
`ray job submit`, ...) must be run by a test (or by .ci/run, or by the cluster helper
the tests use), and each flag the docs give it must be one such a file passes. A bench
counts as run when tests/test_bench.py runs its smoke. What no test runs is listed in
NOT_RUN with the reason, and the list is held exact."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.helpers import REPO
from tests.test_bench import SMOKED

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNERS = [*sorted((REPO / "tests").glob("test_*.py")), REPO / "bench" / "cluster.py", REPO / ".ci" / "run"]
PROGRAMS = (".venv/bin/python", "python", "python3", ".venv/bin/pip", "ray", "wandb", "export")
RUN_ELSEWHERE = {"-m bench.gpu_check": "tests/test_gpu_check.py"}  # its --dry run
NOT_RUN = {
    "-m bench.default_run": "runs tune_main.py whole at two revisions: no smoke run yet",
    "-m bench.growth": "runs tune_main.py whole six times a seed: no smoke run yet",
    "-m bench.storage": "its smoke runs tune_main.py whole six times beside an S3 server: too long for CI",
    "-m bench.memory": "samples child processes for minutes: no smoke run yet",
    "-m bench.quality": "needs bench/requirements-realistic.txt, not installed by CI",
    "-m bench.realistic": "needs bench/requirements-realistic.txt, not installed by CI",
    "pip install --no-deps": "installs bench/requirements-realistic.txt, which CI does not",
    "ray stop": "stops every Ray on the machine; the tests stop their own nodes",
    "wandb sync": "needs a W&B server; the tests read the offline files it would upload",
    "export": "a shell's; bench/cluster.py sets RAY_AUTH_MODE=token in the nodes' environment",
}


def commands(text: str) -> list[str]:
    """The commands of a markdown text's indented code blocks, continued lines joined, each
    `a && b` split, comments dropped."""
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("    ") and line.split()[0] in PROGRAMS and not lines[i - 1].rstrip().endswith("\\"):
            command = line.strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            found += re.split(r"\s*&&\s*", command)
    return [shlex.join(shlex.split(c, comments=True)) for c in found]


def entry(words: list[str]) -> str:
    """What a command runs: `tune_main.py`, `-m MODULE`, `pip install`, `ray job submit`, ..."""
    program = words[0].split("/")[-1]
    if program.startswith("python"):
        return f"-m {words[2]}" if words[1] == "-m" else Path(words[1]).name
    if program == "ray" and words[1] == "job":
        return " ".join(words[:3])
    return f"{program} {words[1]}" if program in ("pip", "ray", "wandb") else program


def documented() -> dict[str, set[str]]:
    """Entry point -> the flags the docs give it. The command after a `--` (what `ray job
    submit` runs) counts as a command of its own."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        for command in commands(doc.read_text()):
            words = shlex.split(command)
            parts = [words[:words.index("--")], words[words.index("--") + 1:]] if "--" in words else [words]
            for part in parts:
                found.setdefault(entry(part), set()).update(w.split("=")[0] for w in part if w.startswith("--"))
    return found


def runners(point: str) -> list[Path]:
    """The files that run `point`."""
    if point.startswith("-m bench."):
        name = point.removeprefix("-m bench.")
        return ([REPO / "tests" / "test_bench.py"] if name in SMOKED else
                [REPO / RUN_ELSEWHERE[point]] if point in RUN_ELSEWHERE else [])
    needle = {"tune_main.py": "tune_main", "ray job submit": '"submit"', "ray start": '"start"',
              "-m venv": "-m venv", "pip install": "pip install", "-m pytest": "-m pytest"}.get(
        point, point.removeprefix("-m "))
    return [path for path in RUNNERS if needle in path.read_text()]


def test_every_documented_command_is_run_by_a_test_with_its_flags():
    docs, unrun, missing = documented(), set(), []
    assert {"tune_main.py", "-m genre_ray.predict", "ray job submit"} <= set(docs)
    for point, flags in sorted(docs.items()):
        if point in NOT_RUN:
            unrun.add(point)
            continue
        files = runners(point)
        assert files, f"no test runs `{point}`, which the docs show"
        if point.startswith("-m bench.") or point in RUN_ELSEWHERE:
            continue  # a smoke run sets its bench's arguments itself
        text = "".join(path.read_text() for path in files)
        for flag in sorted(flags):
            if f"{point} {flag}" in NOT_RUN:
                unrun.add(f"{point} {flag}")
            elif not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                missing.append(f"{point} {flag}")
    assert missing == [], "flags the docs give that no test passes"
    assert unrun == set(NOT_RUN)  # a command now run by a test leaves NOT_RUN


def test_commands_are_found_whole():
    text = "Run:\n\n    .venv/bin/python tune_main.py --name a \\\n        --check  # why\n    ray job submit --address X -- python tune_main.py --seed 1\n"
    assert commands(text) == [".venv/bin/python tune_main.py --name a --check",
                              "ray job submit --address X -- python tune_main.py --seed 1"]
    assert entry(shlex.split(commands(text)[1])) == "ray job submit"


def test_every_test_the_docs_cite_exists():
    """A test the docs name as what holds a behaviour (`tests/FILE.py::NAME`) is a test of
    that file: a test renamed or moved must take its citations with it."""
    cited = {(file, name) for doc in DOCS
             for file, name in re.findall(r"tests/(\w+\.py)::(\w+)", doc.read_text())}
    assert len(cited) > 20
    missing = [f"tests/{file}::{name}" for file, name in sorted(cited)
               if not re.search(rf"^def {name}\(", (REPO / "tests" / file).read_text(), re.MULTILINE)]
    assert missing == []
