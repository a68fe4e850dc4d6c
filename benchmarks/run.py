#!/usr/bin/env python
"""The one entry point of visual_mllm's benchmarks: prints the environment and a markdown table.

    python benchmarks/run.py [--quick] [--only NAME ...] [--output FILE] [--threads N]

A section is a module of `benchmarks/sections/` with `TITLE` and `run(settings) -> Section`; adding
one = writing the module and adding a line to SECTIONS below. Times are measured and printed, never
asserted on.
"""
import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT / "research", REPO_ROOT):  # run from a checkout without installing too
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# mindformers writes logs under ./output on import: keep them out of the working directory.
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "visual_mllm_bench_output"))

from benchmarks.common import Settings, environment_lines, markdown_table, OtherLoad  # noqa: E402

# name -> module (imported only when the section runs). Order = order of the table.
SECTIONS = {
    "llm_decode": "benchmarks.sections.llm_decode",
    "image_encoding": "benchmarks.sections.image_encoding",
    "chat_inference": "benchmarks.sections.chat_inference",
    "export_lite": "benchmarks.sections.export_lite",
    "convert_full": "benchmarks.sections.convert_full",
    "finetune_step": "benchmarks.sections.finetune_step",
    "precision_decode": "benchmarks.sections.precision_decode",
    "full_size_infer": "benchmarks.sections.full_size_infer",
    "demo_run": "benchmarks.sections.demo_run",
    "serving": "benchmarks.sections.serving",
}


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repetitions (the smoke test; well under a minute)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(SECTIONS),
                        help=f"run only these sections (of {', '.join(SECTIONS)})")
    parser.add_argument("--output", metavar="FILE", help="also write the markdown report to FILE")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="CPU threads for MindSpore kernels and torch (default: usable cores)")
    parser.add_argument("--reps", type=int, help="timed repetitions of a decode step (default 20, quick 3)")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    return parser.parse_args(argv)


def setup_runtime(threads):
    """Graph mode on CPU and the same thread count for MindSpore and torch (set once, before any graph)."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for name, module in SECTIONS.items():
            print(f"{name}: {importlib.import_module(module).TITLE}")
        return 0
    settings = Settings(quick=args.quick, threads=args.threads)
    if args.quick:
        settings.reps, settings.slow_reps = 3, 2
    if args.reps:
        settings.reps = args.reps
    setup_runtime(settings.threads)

    names = args.only or list(SECTIONS)
    sections, failed = [], []
    others = OtherLoad().start()
    start = time.perf_counter()
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            sections.append(importlib.import_module(SECTIONS[name]).run(settings))
        except Exception:  # report the others, fail at the end
            traceback.print_exc()
            failed.append(name)
    elapsed = time.perf_counter() - start

    lines = ["# visual_mllm benchmarks", ""]
    other_cores = others.stop()
    load = ("unknown" if other_cores is None else
            f"{other_cores:.2f} cores on average (0 = the machine was ours; near {settings.threads}: "
            "times are inflated)")
    lines += environment_lines(settings, [f"- sections: {', '.join(names)}; total time {elapsed:.0f} s",
                                          f"- other processes' CPU use during the run: {load}"])
    for section in sections:
        lines += section.config
    lines += [""] + markdown_table(sections)
    for section in sections:
        if section.notes:
            lines += ["", f"Notes ({section.name}):", ""] + [f"- {note}" for note in section.notes]
    if failed:
        lines += ["", f"FAILED sections: {', '.join(failed)} (traceback on stderr)"]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.output:
        Path(args.output).write_text(report, encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
