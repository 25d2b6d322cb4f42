"""Where the wall time of a ``carbonsr downscale`` command goes (issue 20), old tree vs new.

Runs the real CLI (``python -m carbonsr_cli.cli downscale ...``) as a child process for each
method (``uniform``, ``dasymetric``, ``model`` with a ``base``/``tiny`` checkpoint) and splits
its wall time, measured from outside (``time.time()`` before the child starts and after it has
exited), into stages:

    import    interpreter start-up and imports, until the downscale command function runs
    planning  build_plan() less the stages below (options, main raster, checkpoint, discovery)
    torch     the first ``import torch`` on the main thread (as far as it blocks it)
    coverage  the aux stack and its coverage check (_checked_stack)
    stats     the scan of the main raster (_scan_main) and the checkpoint's aux statistics
    model     the wait for the model loading in the background while planning ran
              (``PlannedRun.wait_for_model``; trees before session 12 load it inside planning)
    loop      run_pipeline(): the row loop (read, fill/predict, write)
    check     the conservation re-read of the written file
    print     the summary table
    exit      from the command's return to the end of the process (interpreter shutdown)

Stages are timed by wrapping those functions where the downscale modules call them (the
child is started with ``-c`` code that patches them and then calls the CLI), so the same measurement works on the tree before and after a change:

    python benchmarks/command_stages.py                       # this tree, 100 km, 3 repeats
    python benchmarks/command_stages.py --old ../before-tree  # plus old vs new ratios

With ``--old`` the trees run alternately (old, new, new-cold, old, ...) on the same inputs and
the table gives the median of each; ``old/this`` is the old wall time over this one (> 1:
faster than before). ``new`` runs with the cache of per-input work (``carbonsr_cli/aux/cache.py``)
filled by a warm-up run, as a repeated command finds it; ``new-cold`` with the cache off, as a
first run on new inputs. Every command may keep compiled bytecode (a folder in the temp
directory, filled by the warm-up runs), as installed packages have it, even where
``PYTHONDONTWRITEBYTECODE`` is set (the GPU machines); ``--no-bytecode-cache`` honours it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("import", "planning", "torch", "coverage", "stats", "model", "loop", "check", "print", "exit")

# Child-side code: patch the stage functions at their call sites, then run the CLI.
CHILD = r"""
import json, sys, time, atexit
T = {"marks": {}, "seconds": {}}
LOG = sys.argv[1]
def _add(k, dt): T["seconds"][k] = T["seconds"].get(k, 0.0) + dt
def _wrap(mod, name, key):
    fn = getattr(mod, name, None)
    if fn is None or getattr(fn, "_staged", False):
        return
    def w(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _add(key, time.perf_counter() - t0)
    w._staged = True
    setattr(mod, name, w)
import importlib, threading
_orig_import = __builtins__.__import__ if hasattr(__builtins__, "__import__") else __import__
import builtins
def _imp(name, *a, **k):
    if name == "torch" and "torch" not in sys.modules and threading.current_thread() is threading.main_thread():
        t0 = time.perf_counter()
        try:
            return _orig_import(name, *a, **k)
        finally:
            _add("torch", time.perf_counter() - t0)
    return _orig_import(name, *a, **k)
builtins.__import__ = _imp
def _cmd_started():
    T["marks"]["command"] = time.time()
    p = importlib.import_module("carbonsr_cli.downscale.planning")
    a = importlib.import_module("carbonsr_cli.downscale.api")
    _wrap(p, "_checked_stack", "coverage")
    _wrap(p, "_scan_main", "stats")
    _wrap(p, "_normalizer", "stats")
    _wrap(a, "build_plan", "planning_all")
    _wrap(getattr(p, "PlannedRun", None), "wait_for_model", "model")
    _wrap(a, "run_pipeline", "loop")
    _wrap(a, "check_written_conservation", "check")
import carbonsr_cli.commands.downscale as cd
_reg = cd.register
def register(app):
    _reg(app)
    cmd = app.registered_commands[-1]
    cb = cmd.callback
    import functools
    @functools.wraps(cb)
    def staged(*a, **k):
        _cmd_started()
        try:
            return cb(*a, **k)
        finally:
            T["marks"]["returned"] = time.time()
    cmd.callback = staged
cd.register = register
def _printed(fn):
    def w(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _add("print", time.perf_counter() - t0)
    return w
cd._print_table = _printed(cd._print_table)
def _dump():
    with open(LOG, "w") as fh:
        json.dump(T, fh)
atexit.register(_dump)
sys.argv = ["carbonsr", *sys.argv[2:]]
from carbonsr_cli.cli import main
main()
"""


#: Where the commands' bytecode goes (``PYTHONPYCACHEPREFIX``) when the packages' own
#: ``__pycache__`` folders cannot be used (see :func:`run_once`).
PYCACHE = Path(tempfile.gettempdir()) / "carbonsr-bench-pycache"


def run_once(tree: Path, args: list[str], python: str, extra_env: dict[str, str] | None = None,
             bytecode: bool = True) -> dict[str, float]:
    """Run one command of ``tree``; its stage seconds (and ``wall``).

    ``bytecode``: the command may write and read compiled bytecode (``PYTHONDONTWRITEBYTECODE``
    removed, ``PYTHONPYCACHEPREFIX`` set to :data:`PYCACHE` unless set), as a user's installed
    packages have it. The GPU machines set ``PYTHONDONTWRITEBYTECODE=1``: every command there
    compiled torch's Python from source (about half of ``import torch``'s samples in a py-spy
    profile, session 12); figures before session 12 include that cost.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        log = Path(fh.name)
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)  # tree first
    env = dict(os.environ, PYTHONPATH=path, **(extra_env or {}))  # CUDA_VISIBLE_DEVICES passed on as set (unset: all GPUs)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.setdefault("PYTHONPYCACHEPREFIX", str(PYCACHE))
    t0 = time.time()
    done = subprocess.run([python, "-c", CHILD, str(log), "downscale", *args], env=env, cwd=str(tree),
                          capture_output=True, text=True)
    t1 = time.time()
    if done.returncode != 0:
        raise SystemExit(f"failed ({tree}): {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rec = json.loads(log.read_text())
    log.unlink()
    s, m = rec["seconds"], rec["marks"]
    out = {"wall": t1 - t0, "import": m["command"] - t0, "exit": t1 - m["returned"]}
    for k in ("torch", "coverage", "stats", "model", "loop", "check", "print"):
        out[k] = s.get(k, 0.0)
    # planning: build_plan less what is reported separately inside it (torch: only the part on
    # the main thread inside build_plan is subtracted; an import in the loop counts there)
    inside = out["coverage"] + out["stats"]
    out["planning"] = max(0.0, s.get("planning_all", 0.0) - inside)
    out["command_other"] = ((m["returned"] - m["command"]) - s.get("planning_all", 0.0) - out["model"] - out["loop"]
                            - out["check"] - out["print"])
    return out


def commands(data: Path, work: Path, checkpoint: Path | None, methods: list[str], device: str) -> dict[str, list[str]]:
    main = str(data / "emissions_1km.tif")
    aux = str(data / "aux")
    common = ["--device", device, "--overwrite", "--quiet"]
    cmds = {}
    for m in methods:
        out = str(work / f"out_{m}.tif")
        if m == "uniform":
            cmds[m] = [main, "--method", "uniform", "-o", out, *common]
        elif m == "dasymetric":
            cmds[m] = [main, "--aux", aux, "--method", "dasymetric", "-o", out, *common]
        else:
            cmds[m] = [main, "--aux", aux, "--model", str(checkpoint), "-o", out, *common]
    return cmds


def table(results: dict[str, dict[str, list[dict[str, float]]]], trees: list[str]) -> str:
    med = {t: {m: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for m, runs in per.items()}
           for t, per in results.items()}
    lines = []
    methods = list(next(iter(results.values())).keys())
    head = f"{'stage (s, median)':<18}" + "".join(f"{f'{m} {t}':>18}" for m in methods for t in trees)
    lines.append(head)
    lines.append("-" * len(head))
    for per in results.values():  # the model's row loop is compute bound and noisy on a shared CPU
        for runs in per.values():
            for r in runs:
                r["outside loop"] = r["wall"] - r["loop"]
    med = {t: {m: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for m, runs in per.items()}
           for t, per in results.items()}
    for k in (*STAGES, "command_other", "outside loop", "wall"):
        lines.append(f"{k:<18}" + "".join(f"{med[t][m][k]:>18.2f}" for m in methods for t in trees))
    if len(trees) >= 2 and trees[0] == "old":
        lines.append("")
        lines.append(f"{'method':<12}{'tree':<10}{'wall s':>8}{'old/this':>10}{'outside loop s':>16}{'old/this':>10}   runs (wall)")
        for m in methods:
            o, ol = med["old"][m]["wall"], med["old"][m]["outside loop"]
            for t in trees:
                n, nl = med[t][m]["wall"], med[t][m]["outside loop"]
                runs = " ".join(f"{r['wall']:.2f}" for r in results[t][m])
                lines.append(f"{m:<12}{t:<10}{n:>8.2f}{o / n:>10.2f}{nl:>16.2f}{ol / nl:>10.2f}   {runs}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, default=None, help="tree before the change (ratio table old/new)")
    ap.add_argument("--new", type=Path, default=HERE.parent, help="tree after (default: this one)")
    ap.add_argument("--size-km", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=["uniform", "dasymetric", "model"])
    ap.add_argument("--preset", default="tiny", help="model preset of the random checkpoint (tiny, base)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=None, help="existing sample-data directory (default: generate)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="existing checkpoint (default: random preset)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-cold", action="store_true", help="skip the runs with the cache off")
    ap.add_argument("--table", type=Path, default=None, help="print the table of an earlier --json and exit")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="run the commands as the environment says (PYTHONDONTWRITEBYTECODE honoured)")
    args = ap.parse_args()
    if args.table is not None:
        res = json.loads(args.table.read_text())
        print(table(res, list(res)))
        return
    python = sys.executable
    work = args.workdir or Path(tempfile.mkdtemp(prefix="carbonsr_stages_"))
    work.mkdir(parents=True, exist_ok=True)
    new = args.new.resolve()
    sys.path[:0] = [str(new), str(HERE)]
    data = args.data
    if data is None:
        from carbonsr_cli.sample_data import generate_sample_data

        data = work / f"region{args.size_km}"
        generate_sample_data(data, size_km=args.size_km, years=(2020,), overwrite=True)
        time.sleep(2.5)  # files a few seconds old, as inputs usually are
    ckpt = args.checkpoint
    if "model" in args.methods and ckpt is None:
        from bench_downscale import _make_checkpoint

        from carbonsr_cli.aux import discover_aux, layer_names

        ckpt = _make_checkpoint(work / f"{args.preset}.pth", args.preset, layer_names(discover_aux([data / "aux"])), 1)
    # new: the cache of per-input work (aux/cache.py) in its own directory, filled by the warm-up
    # run (a repeated command); new-cold: the cache off (a first run on these inputs)
    cache = {"CARBONSR_CACHE_DIR": str(work / "cache")}
    trees = [("old", args.old.resolve(), {})] if args.old else []
    trees.append(("new", new, cache))
    if not args.no_cold:
        trees.append(("new-cold", new, {"CARBONSR_CACHE": "0"}))
    cmds = commands(data, work, ckpt, args.methods, args.device)
    results: dict[str, dict[str, list[dict[str, float]]]] = {t: {m: [] for m in cmds} for t, _, _ in trees}
    bytecode = not args.no_bytecode_cache
    for m, cmd in cmds.items():
        run_once(new, cmd, python, cache, bytecode)  # warm the page cache, the bytecode and the per-input cache
        if args.old and bytecode:
            run_once(args.old.resolve(), cmd, python, {}, bytecode)  # the old tree's bytecode
        for i in range(args.repeat):
            for label, tree, env in trees:
                r = run_once(tree, cmd, python, env, bytecode)
                results[label][m].append(r)
                print(f"# {m} {label} run {i + 1}: wall {r['wall']:.2f} s  "
                      + json.dumps({k: round(v, 2) for k, v in r.items() if k != "wall"}), file=sys.stderr, flush=True)
    print(f"carbonsr downscale command stages  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"{data.name}, device {args.device}, {os.cpu_count()} CPUs, model preset {args.preset}")
    print(table(results, [t for t, _, _ in trees]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
