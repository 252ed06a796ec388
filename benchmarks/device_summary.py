"""The last step of ``benchmarks/device.sh``: one ``summary.json`` and a short table from its parts.

Reads ``figures.json`` (``device_figures.py``), ``attention.json`` (``attention_packing.py``),
``pytest.xml`` (the CUDA tests) and ``ddp.json`` (``device_ddp.py``) in the output folder, plus
each step's exit status and seconds (``--step NAME=STATUS:SECONDS``), and prints every target
with its value, its goal, whether it was met and the GPU it was measured on. The standard
library only, so it runs whatever failed before it.

    python benchmarks/device_summary.py OUT --step figures=0:95 --step attention=0:80 ...
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"missing": f"{path.name}: {type(e).__name__}: {e}"}


def tests(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"missing": f"{path.name}: {type(e).__name__}: {e}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["failed"], out["skipped_tests"] = [], []
    for case in suite.iter("testcase"):
        name = case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(name)
        elif case.find("skipped") is not None:
            out["skipped_tests"].append(f"{name}: {case.find('skipped').get('message', '')}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--step", action="append", default=[], help="NAME=STATUS:SECONDS")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    steps = {}
    for s in args.step:
        name, _, rest = s.partition("=")
        status, _, secs = rest.partition(":")
        steps[name] = {"status": status, "seconds": float(secs) if secs else None}
    figures = read_json(out / "figures.json")
    attention = read_json(out / "attention.json")
    ddp = read_json(out / "ddp.json")
    summary = {
        "smoke": args.smoke,
        "gpu": figures.get("env", {}).get("gpu") or attention.get("gpu"),
        "gpus": figures.get("env", {}).get("gpus"),
        "env": figures.get("env"),
        "targets": figures.get("targets", []),
        "attention": attention.get("verdict"),
        "shapes": figures.get("shapes"),
        "tests": tests(out / "pytest.xml"),
        "ddp": ddp,
        "steps": steps,
        "errors": {**figures.get("errors", {}), **({"attention": attention["errors"]} if attention.get("errors") else {})},
        "files": sorted(p.name for p in out.iterdir() if p.is_file()) + ["summary.json"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    gpu = summary["gpu"] or "?"
    print(f"\n==== issue 16 figures on {gpu} ({summary['gpus']} GPU(s)){' [SMOKE: not figures]' if args.smoke else ''}")
    print("| target | value | goal | met |\n|---|---|---|---|")
    for t in summary["targets"]:
        v = t["value"]
        val = "n/a" if v is None else (f"{v:.1%}" if "mfu" in t["id"] else f"{v:,.3g}")
        print(f"| {t['what']} | {val} | {t['target']} | {t['met']} |")
    a = summary["attention"]
    print(f"| bucketing vs packed varlen attention | {a['text'] if a else attention.get('missing') or 'n/a'} | which wins | - |")
    for r in (summary["shapes"] or {}).get("runs", []):
        print(f"| batch shapes ({summary['shapes']['model']}, {summary['shapes']['cells']} {summary['shapes']['source']} "
              f"cells): grid {r['grid']}, attention {r['attention']} | {r['shapes']} shapes, first pass "
              f"{r['first_pass_cells_per_s']:,.0f} cells/s, warm {r['warm_cells_per_s']:,.0f} | - | - |")
    te = summary["tests"]
    if "missing" in te:
        print(f"| CUDA tests | {te['missing']} | pass | False |")
    else:
        print(f"| CUDA tests (pytest -m cuda) | {te['passed']} passed, {te['failures'] + te['errors']} failed, "
              f"{te['skipped']} skipped | pass | {te['failures'] + te['errors'] == 0 and te['passed'] > 0} |")
        for f in te["failed"]:
            print(f"|   failed: {f} | | | |")
    if ddp.get("ran") is False:
        print(f"| DDP/FSDP with nccl | not run: {ddp.get('note')} | - | - |")
    elif "missing" in ddp:
        print(f"| DDP/FSDP | {ddp['missing']} | equal to one process | False |")
    else:
        print(f"| DDP/FSDP ({ddp.get('backend')}, {ddp.get('world_size')} processes) | "
              f"ddp {ddp.get('ddp', {}).get('ok')}, fsdp {ddp.get('fsdp', {}).get('ok')} | equal to one process | "
              f"{bool(ddp.get('ddp', {}).get('ok') and ddp.get('fsdp', {}).get('ok'))} |")
    print("steps: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in steps.items()))
    if summary["errors"]:
        print(f"errors: {json.dumps(summary['errors'])[:1500]}")
    print(f"files: {', '.join(summary['files'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
