"""Mutation score of the guards: plant small bugs in the code that decides what gets rewritten, and
count how many the tests catch.

Runs `mutmut <https://mutmut.readthedocs.io>`_ (3.x) on a copy of the repository (so the checkout
and its ``pyproject.toml`` stay untouched): each mutant — a flipped comparison, a changed constant,
a dropped call, in one of the guard files — is run against the tests that exercise the guard
(mutmut picks, per mutated function, the tests that call it).  Prints one line per file (killed,
survived, other, score) and the surviving mutants by name; ``cd <workdir> && mutmut show NAME``
prints a survivor's diff.

Usage::

    pip install mutmut
    python bench/mutation_score.py                       # the guards, their tests (tens of minutes on 2 cores)
    python bench/mutation_score.py --files attnrewrite/rewriter/certify.py --children 2
    # failures.py's recompile path is tested in test_trust.py: name those tests (pytest node ids work)
    python bench/mutation_score.py --files attnrewrite/rewriter/failures.py --tests tests/rewriter/test_strict_paths.py \
        tests/rewriter/test_trust.py::test_strict_raises_at_the_recompile_limit --workdir /tmp/mut-failures
    # after adding tests: re-run only the survivors of that run (the mutated files must be unchanged)
    python bench/mutation_score.py --files attnrewrite/rewriter/failures.py --tests ... --workdir /tmp/mut-failures --rerun

A function every compile reaches (certify.py's ``certify``, ``fingerprint``) runs each surviving mutant against
every test of the selection: run it on its own, in a fresh workdir, with the test file aimed at it (a narrower
selection can only undercount kills)::

    python bench/mutation_score.py --files attnrewrite/rewriter/certify.py \
        --tests tests/rewriter/test_certifier_sensitivity.py --workdir /tmp/mut-certify \
        --mutants 'attnrewrite.rewriter.certify.x_certify__mutmut_*'

``--tests`` must list the same files in a ``--rerun`` (mutmut re-runs everything when its test selection
changes); put new tests in those files.  A mutant killed before stays killed (tests were only added), so
the re-run's table is the score at the new commit.

Not part of CI: too slow on 2 cores.  Results go to ``bench/RESULTS.md`` with the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The code that decides what gets rewritten and says when it does not.
GUARDS = [
    "attnrewrite/rewriter/certify.py",    # the certifier: a spec must reproduce the site
    "attnrewrite/rewriter/failures.py",   # strict / warnings: never silent
    "attnrewrite/rewriter/pipeline.py",   # the strict path and the stages' guards
    "attnrewrite/patterns/masks.py",      # mask resolution: causal claims, padding
    "attnrewrite/patterns/layout.py",     # scale folding (fold_constant_scale) and layouts
]

#: Tests aimed at the guards (mutmut runs, per mutant, those among them that reach the mutated code).
TESTS = [
    "tests/rewriter/test_certifier_sensitivity.py",
    "tests/rewriter/test_strict_paths.py",
    "tests/rewriter/test_negative.py",
    "tests/rewriter/test_inplace_masks.py",   # certify's in-place-write guards
    "tests/rewriter/test_backend.py",
    "tests/patterns/test_spellings.py",
]


def _config(files: list[str], tests: list[str]) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return ("\n[tool.mutmut]\n"
            'source_paths = ["attnrewrite"]\n'
            f"only_mutate = {toml_list(files)}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:logging", "-x", "-q"]\n'
            # a forked mutant run compiles models: allow for a loaded machine
            "timeout_multiplier = 30.0\ntimeout_constant = 60.0\n")


def _results(workdir: Path, files: list[str]) -> dict[str, Counter]:
    """Per mutated file: a Counter of mutmut statuses, plus the names of survivors under 'names'."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, Counter] = {}
    for path in files:
        meta = workdir / "mutants" / (path + ".meta")
        counts: Counter = Counter()
        survivors = []
        if meta.exists():
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                status = status_by_exit_code[code]
                counts[status] += 1
                if status == "survived":
                    survivors.append(name)
        counts["names"] = survivors  # type: ignore[assignment]
        out[path] = counts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", default=GUARDS, help="files to mutate (default: the guards)")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="test files to run against the mutants")
    parser.add_argument("--children", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the copy here (default: a temp dir)")
    parser.add_argument("--rerun", action="store_true",
                        help="with the --workdir of an earlier run: refresh the tests, re-run only its survivors")
    parser.add_argument("--mutants", nargs="+", default=(), help="run only these mutants (names or globs)")
    args = parser.parse_args()
    files = [f for f in args.files if (ROOT / f).exists()]
    missing = sorted(set(args.files) - set(files))
    if missing:
        print("not found, skipped:", ", ".join(missing))

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="attnrewrite-mutation-"))
    names = list(args.mutants)
    if args.rerun:
        if args.workdir is None or not (workdir / "mutants").is_dir():
            sys.exit("--rerun needs the --workdir of an earlier run")
        changed = [f for f in files if (workdir / f).read_bytes() != (ROOT / f).read_bytes()]
        if changed:
            sys.exit(f"--rerun: {', '.join(changed)} changed since that run; run them afresh")
        names += [n for counts in _results(workdir, files).values() for n in counts["names"]]
        if not names:
            sys.exit("--rerun: that run left no survivors")
        print(f"re-running {len(names)} survivor(s) of the run at {(workdir / 'COMMIT').read_text().strip()}")
    for name in ("attnrewrite", "tests"):
        shutil.copytree(ROOT / name, workdir / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (workdir / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + _config(files, args.tests))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"mutating {len(files)} file(s) at commit {commit} in {workdir}", flush=True)
    if not args.rerun:
        (workdir / "COMMIT").write_text(commit + "\n")
    # mutmut forks one process per mutant after importing torch: one intra-op thread, or the
    # forked children can wait forever on the parent's thread pool
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.children), *names],
                   cwd=workdir, check=False, env=env)

    results = _results(workdir, files)
    print(f"\nmutation score at {commit} (killed / (killed + survived); 'other': no tests, timeouts, ...)")
    print("| file | mutants | killed | survived | other | score |\n|---|---|---|---|---|---|")
    for path, counts in results.items():
        killed, survived = counts["killed"], counts["survived"]
        total = sum(v for k, v in counts.items() if k != "names")
        score = f"{killed / (killed + survived):.0%}" if killed + survived else "-"
        print(f"| {path} | {total} | {killed} | {survived} | {total - killed - survived} | {score} |")
    for path, counts in results.items():
        for name in counts["names"]:
            print("survived:", name)
    print(f"\nshow a survivor: cd {workdir} && python -m mutmut show NAME")


if __name__ == "__main__":
    main()
