"""ONNX backend conformance of tensorpress on the CPU: pass counts per group of ONNX's own test cases.

Each case is compiled with the backend of `tests/onnx_backend/tensorpress_backend.py` (tensorpress.compile
for the CPU, run with the runtime) and compared the way `onnx.backend.test` compares (its rtol/atol).
A case ends as one of:
    passed    compiled, ran, matched the reference outputs
    refused   a TensorpressError: one sentence saying why (unsupported operator, dtype, form, ...)
    wrong     ran but did not match (a silent wrong answer: a bug)
    crashed   any other exception (an internal error: a bug)

    .venv/bin/python benchmarks/onnx_conformance.py                         # all groups, ~20 min on 2 cores
    .venv/bin/python benchmarks/onnx_conformance.py --groups pytorch-converted,pytorch-operator,simple
    .venv/bin/python benchmarks/onnx_conformance.py --groups node --every 10  # a tenth of the node tests

Writes benchmarks/results/onnx_conformance_<device>_<time>.json (counts, and the name and first line of
every case that was not passed, by outcome).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.append(str(ROOT / "tests" / "onnx_backend"))

GROUPS = ("pytorch-converted", "pytorch-operator", "simple", "node")


def cases(group: str):
    """(name, model, data sets, rtol, atol) of every case in `group` ("node" is built in memory)."""
    import onnx
    from onnx.backend.test.loader import load_model_tests

    if group == "node":
        from onnx.backend.test.case import node

        for case in node.collect_testcases():
            yield case.name, case.model, case.data_sets, case.rtol, case.atol
        return
    for case in load_model_tests(kind=group):
        yield case.name, onnx.load(f"{case.model_dir}/model.onnx"), _data_sets(case.model_dir), case.rtol, case.atol


def _data_sets(model_dir: str):
    import onnx
    from onnx import numpy_helper

    def load(folder: Path, kind: str) -> list:
        return [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(folder.glob(f"{kind}_*.pb"))]

    return [(load(f, "input"), load(f, "output")) for f in sorted(Path(model_dir).glob("test_data_set_*"))]


def main(argv=None) -> int:
    from harness import environment, write_results
    from tensorpress_backend import classify

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--every", type=int, default=1, help="run every n-th case of each group (a sample)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    report: dict = {}
    for group in args.groups.split(","):
        counts: dict[str, int] = defaultdict(int)
        details: dict[str, dict[str, str]] = defaultdict(dict)
        for index, (name, model, data_sets, rtol, atol) in enumerate(cases(group)):
            if index % args.every:
                continue
            outcome, reason = classify(model, data_sets, rtol, atol)
            counts[outcome] += 1
            if outcome != "passed":
                details[outcome][name] = reason
            print(f"{group:18s} {name:60s} {outcome}", flush=True)
        total = sum(counts.values())
        report[group] = {
            "total": total,
            **{k: counts[k] for k in ("passed", "refused", "wrong", "crashed")},
            "pass_rate": round(counts["passed"] / max(total, 1), 4),
            "cases": dict(details),
        }
        print(f"{group}: {counts['passed']}/{total} passed, {counts['refused']} refused, "
              f"{counts['wrong']} wrong, {counts['crashed']} crashed")  # fmt: skip
    payload = {"environment": environment(extra={"every": args.every}), "groups": report}
    print(f"wrote {write_results(args.out, 'onnx_conformance', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
