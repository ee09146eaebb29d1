#!/usr/bin/env bash
# One command for a fresh GPU machine that already has a CUDA build of torch (no network needed): install Lunaris
# from this working tree, run the CUDA tests, run `lunaris bench --device cuda`, and write everything to
# OUT/report.json and OUT/report.md. See usage() below, or run it with --help.

set -uo pipefail

usage() {
    cat <<'EOF'
usage: bench/gpu_check.sh [--out DIR] [--skip-tests] [--skip-bench] [--dry-run] [-h|--help]

Check Lunaris on this machine's GPU in under 8 minutes, without network access:

  1. preflight  python -c 'import torch' must work and torch.cuda.is_available() must be True; otherwise the
                script stops here (exit 3: no torch, exit 4: no CUDA GPU) and installs nothing.
  2. install    wheels found in wheels/ (pip install --no-index --no-deps; never a torch wheel), then Lunaris
                from this working tree (pip install --no-index --no-deps --no-build-isolation -e .; if pip
                cannot, the source tree is used through PYTHONPATH). torch is never installed or replaced.
  3. tests      python -m pytest tests/cuda (needs pytest; a pytest wheel in wheels/ is installed in step 2).
  4. bench      lunaris bench --device cuda: dense 100m (eager and compiled, vs transformers' Llama) with MoC
                top-2/8 vs dense, then dense 350m; tokens/s, MFU and peak memory (needs transformers).
  5. report     OUT/report.json (everything) and OUT/report.md (tables), plus each stage's log in OUT/.

Each stage runs under `timeout`; the whole run stays within GPU_CHECK_BUDGET_S seconds (default 450). A stage
that does not fit the time left is skipped and the report says so.

options:
  --out DIR      output directory (default gpu-check/)
  --skip-tests   do not run the CUDA tests
  --skip-bench   do not run lunaris bench
  --dry-run      print the stages that would run, run nothing
  -h, --help     show this help

environment: PYTHON (interpreter with torch; default python, else python3), GPU_CHECK_WHEELS (wheel directory;
default wheels/ in the working tree), GPU_CHECK_BUDGET_S (time budget in seconds; default 450).

exit status: 0 every stage that ran passed; 1 a stage failed or timed out; 2 bad arguments; 3 torch cannot be
imported; 4 no CUDA GPU; 5 Lunaris or its dependencies cannot be imported after the install.
EOF
}

die_usage() {
    echo "gpu_check.sh: $1" >&2
    echo "usage: bench/gpu_check.sh [--out DIR] [--skip-tests] [--skip-bench] [--dry-run] [-h|--help]" >&2
    exit 2
}

OUT="gpu-check"
SKIP_TESTS=0
SKIP_BENCH=0
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) [ $# -ge 2 ] && [ -n "$2" ] || die_usage "--out needs a directory"; OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}"; [ -n "$OUT" ] || die_usage "--out needs a directory" ;;
        --skip-tests) SKIP_TESTS=1 ;;
        --skip-bench) SKIP_BENCH=1 ;;
        --dry-run) DRY_RUN=1 ;;
        *) die_usage "unknown option '$1'" ;;
    esac
    shift
done

case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac   # relative to where the command was typed
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
WHEELS="${GPU_CHECK_WHEELS:-$REPO/wheels}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
case "$BUDGET" in ''|*[!0-9]*) die_usage "GPU_CHECK_BUDGET_S must be a number of seconds, got '$BUDGET'" ;; esac
# Stage caps (seconds); the bench gets whatever the budget has left.
PREFLIGHT_CAP=60
INSTALL_CAP=90
TESTS_CAP=210
BENCH_MIN=60   # a bench run needs at least this long to measure anything
# name|lunaris bench options: the first run also times MoC top-2/8 against dense at its size
BENCH_RUNS=(
    "100m|--sizes 100m --seq-len 2048 --batch 8 --warmup 2 --repeats 5 --compile --no-scripts"
    "350m|--sizes 350m --seq-len 2048 --batch 8 --warmup 2 --repeats 5 --compile --no-moc --no-scripts"
)

# wheels to install: every *.whl in WHEELS except torch itself (this script never replaces torch)
WHEEL_FILES=()
SKIPPED_WHEELS=()
if [ -d "$WHEELS" ]; then
    for wheel in "$WHEELS"/*.whl; do
        [ -e "$wheel" ] || continue
        case "$(basename "$wheel")" in
            torch-*|Torch-*) SKIPPED_WHEELS+=("$wheel") ;;
            *) WHEEL_FILES+=("$wheel") ;;
        esac
    done
fi

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh --dry-run: nothing is run. Plan (time budget ${BUDGET} s, output in $OUT/):"
    echo "  1. preflight (<= ${PREFLIGHT_CAP} s): $PYTHON -c 'import torch'; require torch.cuda.is_available(); stop"
    echo "     here without installing anything if either fails"
    echo "  2. install (<= ${INSTALL_CAP} s):"
    if [ ${#WHEEL_FILES[@]} -gt 0 ]; then
        echo "     $PYTHON -m pip install --no-index --no-deps ${WHEEL_FILES[*]}"
    else
        echo "     no wheels in $WHEELS"
    fi
    for wheel in ${SKIPPED_WHEELS[@]+"${SKIPPED_WHEELS[@]}"}; do
        echo "     skip $wheel: never replaces torch"
    done
    echo "     $PYTHON -m pip install --no-index --no-deps --no-build-isolation -e $REPO"
    echo "     (if pip cannot: PYTHONPATH=$REPO/src)"
    if [ "$SKIP_TESTS" = 1 ]; then
        echo "  3. tests: skipped (--skip-tests)"
    else
        echo "  3. tests (<= ${TESTS_CAP} s): $PYTHON -m pytest tests/cuda -p no:cacheprovider -rs --junitxml=$OUT/tests.xml"
    fi
    if [ "$SKIP_BENCH" = 1 ]; then
        echo "  4. bench: skipped (--skip-bench)"
    else
        echo "  4. bench (the rest of the budget, each run only if >= ${BENCH_MIN} s are left):"
        for run in "${BENCH_RUNS[@]}"; do
            echo "     $PYTHON -m lunaris bench --device cuda ${run#*|} --json $OUT/bench-${run%%|*}.json"
        done
    fi
    echo "  5. report: $OUT/report.json and $OUT/report.md"
    exit 0
fi

START=$(date +%s)
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
limit_for() { local left; left=$(( $(remaining) - 5 )); [ "$left" -lt 10 ] && left=10; min "$1" "$left"; }

mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create output directory $OUT" >&2; exit 1; }
OUT="$(cd "$OUT" && pwd)"
STAGES="$OUT/stages.tsv"
: > "$STAGES"
FAILED=0

# record NAME STATUS SECONDS NOTE [LOG]: one line per stage for the report
record() {
    local note="${4//$'\t'/ }"
    note="${note//$'\n'/ }"
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$note" "${5:-}" >> "$STAGES"
    printf '[gpu_check] %-12s %-8s %4ss  %s\n' "$1" "$2" "$3" "$note" >&2
}

# run_stage NAME TIMEOUT LOG COMMAND...: runs under timeout, prints its output, sets STAGE_RC and STAGE_SECONDS
run_stage() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local began
    began=$(date +%s)
    echo "[gpu_check] $name (timeout ${limit} s): $*" >&2
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
    STAGE_RC=${PIPESTATUS[0]}
    STAGE_SECONDS=$(( $(date +%s) - began ))
}

status_of() {  # exit status -> ok / failed / timeout
    case "$1" in
        0) echo ok ;;
        124|137) echo timeout ;;
        *) echo failed ;;
    esac
}

write_report() {
    OUT="$OUT" BUDGET="$BUDGET" START="$START" REPO="$REPO" "$PYTHON" - <<'PYEOF' || echo "gpu_check.sh: could not write the report" >&2
import datetime, glob, json, os, subprocess
import xml.etree.ElementTree as ET

out = os.environ["OUT"]


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


stages = []
with open(os.path.join(out, "stages.tsv")) as f:
    for line in f:
        name, status, seconds, note, log = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
        stages.append({"stage": name, "status": status, "seconds": int(seconds or 0), "note": note,
                       "log": os.path.basename(log) if log else None})

tests = None
if os.path.exists(os.path.join(out, "tests.xml")):
    try:
        root = ET.parse(os.path.join(out, "tests.xml")).getroot()
        cases = []
        for case in root.iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                child = case.find(tag)
                if child is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    text = child.get("message") or child.text or ""
                    message = (text.strip().splitlines() or [""])[0][:300]
                    break
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time") or 0), "message": message})
        counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
        tests = {"counts": counts, "cases": cases}
    except ET.ParseError as exc:
        tests = {"error": f"tests.xml unreadable: {exc}"}

bench = {}
for path in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    name = os.path.basename(path)[len("bench-"):-len(".json")]
    bench[name] = load_json(path)

git = None
try:
    sha = subprocess.run(["git", "-C", os.environ["REPO"], "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", os.environ["REPO"], "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    git = {"commit": sha, "dirty": bool(dirty)} if sha else None
except (OSError, subprocess.SubprocessError):
    pass

report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "budget_s": int(os.environ["BUDGET"]),
          "elapsed_s": int(datetime.datetime.now().timestamp()) - int(os.environ["START"]),
          "git": git, "machine": load_json(os.path.join(out, "preflight.json")),
          "stages": stages, "tests": tests, "bench": bench}
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")

m = report["machine"] or {}
lines = [f"# GPU check, {report['date']}", ""]
if m.get("cuda_available"):
    lines.append(f"{m.get('gpu')} x{m.get('gpu_count')}, {m.get('gpu_memory_gib')} GiB, driver {m.get('driver')}; "
                 f"torch {m.get('torch')} (CUDA {m.get('cuda')}), bf16 {'yes' if m.get('bf16') else 'no'}; "
                 f"Python {m.get('python')}")
elif m:
    lines.append(f"no CUDA GPU; torch {m.get('torch')} (CUDA {m.get('cuda')}); Python {m.get('python')}")
if git:
    lines.append(f"commit {git['commit'][:12]}{' (uncommitted changes)' if git['dirty'] else ''}")
lines += ["", f"{report['elapsed_s']} s of a {report['budget_s']} s budget.", "",
          "| stage | status | seconds | note | log |", "|---|---|---:|---|---|"]
for s in stages:
    lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} | {s['log'] or ''} |")
if tests and "cases" in tests:
    c = tests["counts"]
    lines += ["", f"## CUDA tests: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                  f"{c['skipped']} skipped", ""]
    shown = [t for t in tests["cases"] if t["outcome"] != "passed"]
    if shown:
        lines += ["| test | outcome | message |", "|---|---|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['message'].replace('|', '/')} |" for t in shown]
rows = [(name, row) for name, rep in bench.items() if rep for row in rep.get("results", [])]
if rows:
    lines += ["", "## Training throughput (lunaris bench --device cuda, bf16)", "",
              "| comparison | model | params | tokens/s | x baseline | MFU (peak) | MFU (measured matmul) "
              "| peak MiB | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for name, row in rows:
        memory = row.get("memory") or {}
        note = row.get("error") or memory.get("error") or ""
        versus = f"{row['vs_baseline']:.3f} vs {row['baseline']}" if "vs_baseline" in row else ""
        lines.append(f"| {row.get('comparison')} | {row.get('name')} | {row.get('params', 0) / 1e6:.1f}M | "
                     f"{fmt(row.get('tokens_per_s'), ',.0f')} | {versus} | {fmt(row.get('mfu_peak'), '.3f')} | "
                     f"{fmt(row.get('mfu_measured'), '.3f')} | {fmt(memory.get('peak_mib'), ',.0f')} | {note} |")
    targets = [t for rep in bench.values() if rep for t in rep.get("targets", [])]
    if targets:
        lines += ["", "| target | measured | needed | met |", "|---|---:|---:|---|"]
        lines += [f"| {t['target']} | {t['value']:.3f} | >= {t['at_least']:.2f} | {'yes' if t['met'] else 'NO'} |"
                  for t in targets]
    lines += ["", "Full bench tables: " + ", ".join(f"bench-{name}.log" for name in bench)]
lines.append("")
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
print(f"[gpu_check] report: {os.path.join(out, 'report.json')} and {os.path.join(out, 'report.md')}")
PYEOF
}

finish() {  # finish EXIT_STATUS
    write_report
    exit "$1"
}

# ---- 1. preflight: torch and a CUDA GPU, before anything is installed --------------------------------
began=$(date +%s)
if ! timeout --kill-after=5 "$PREFLIGHT_CAP" "$PYTHON" -c 'import torch' > "$OUT/preflight.log" 2>&1; then
    cat "$OUT/preflight.log" >&2
    record preflight failed "$(( $(date +%s) - began ))" "'$PYTHON -c \"import torch\"' failed" "$OUT/preflight.log"
    echo "gpu_check.sh: '$PYTHON -c \"import torch\"' failed. This script never installs torch: install a CUDA build" \
         "of torch for this machine first (or set PYTHON to the interpreter that has it). Nothing was installed." >&2
    finish 3
fi
timeout --kill-after=5 "$PREFLIGHT_CAP" "$PYTHON" - "$OUT/preflight.json" > "$OUT/preflight.log" 2>&1 <<'PYEOF'
import json, platform, subprocess, sys
import torch

info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "torch_file": torch.__file__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
sys.exit(0 if info["cuda_available"] else 4)
PYEOF
rc=$?
seconds=$(( $(date +%s) - began ))
if [ "$rc" = 4 ]; then
    torch_line=$("$PYTHON" -c 'import json, sys; print("torch {torch}, built for CUDA {cuda}".format(**json.load(open(sys.argv[1]))))' "$OUT/preflight.json" 2>/dev/null)
    record preflight failed "$seconds" "no CUDA GPU: torch.cuda.is_available() is False (${torch_line})" "$OUT/preflight.log"
    echo "gpu_check.sh: no CUDA GPU is visible to torch (torch.cuda.is_available() is False; ${torch_line})." \
         "This check needs a GPU: use a CUDA build of torch and check CUDA_VISIBLE_DEVICES and the driver" \
         "(nvidia-smi). Nothing was installed." >&2
    finish 4
elif [ "$rc" != 0 ]; then
    cat "$OUT/preflight.log" >&2
    record preflight "$(status_of "$rc")" "$seconds" "could not query torch and the GPU (exit $rc)" "$OUT/preflight.log"
    echo "gpu_check.sh: the GPU query failed (see $OUT/preflight.log). Nothing was installed." >&2
    finish 4
fi
gpu_line=$("$PYTHON" -c 'import json, sys; print("{gpu} x{gpu_count}, torch {torch}, CUDA {cuda}, bf16 {bf16}".format(**json.load(open(sys.argv[1]))))' "$OUT/preflight.json")
record preflight ok "$seconds" "$gpu_line" "$OUT/preflight.log"
TORCH_BEFORE=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')

# ---- 2. install: wheels, then Lunaris itself; never torch ----------------------------------------------
began=$(date +%s)
install_notes=()
LUNARIS=("$PYTHON" -m lunaris)
: > "$OUT/install.log"
for wheel in ${SKIPPED_WHEELS[@]+"${SKIPPED_WHEELS[@]}"}; do
    install_notes+=("skipped $(basename "$wheel") (never replaces torch)")
done
if [ ${#WHEEL_FILES[@]} -gt 0 ]; then
    limit=$(limit_for "$INSTALL_CAP")
    if timeout --kill-after=5 "$limit" "$PYTHON" -m pip install --no-index --no-deps "${WHEEL_FILES[@]}" \
            >> "$OUT/install.log" 2>&1; then
        install_notes+=("${#WHEEL_FILES[@]} wheel(s) from $WHEELS")
    else
        install_notes+=("installing the wheels from $WHEELS failed (see install.log)")
    fi
else
    install_notes+=("no wheels in $WHEELS")
fi
limit=$(limit_for "$INSTALL_CAP")
if timeout --kill-after=5 "$limit" "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e "$REPO" \
        >> "$OUT/install.log" 2>&1; then
    install_notes+=("lunaris installed editable from $REPO")
else
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    install_notes+=("pip could not install lunaris (see install.log); using PYTHONPATH=$REPO/src")
fi
TORCH_AFTER=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)' 2>/dev/null)
if [ "$TORCH_AFTER" != "$TORCH_BEFORE" ]; then
    record install failed "$(( $(date +%s) - began ))" "torch changed during the install: '$TORCH_BEFORE' -> '$TORCH_AFTER'" "$OUT/install.log"
    echo "gpu_check.sh: torch changed during the install ('$TORCH_BEFORE' -> '$TORCH_AFTER'); a wheel in $WHEELS" \
         "must have replaced it. Remove it and reinstall torch." >&2
    finish 5
fi
if ! "$PYTHON" -c 'import numpy, yaml, lunaris, lunaris.train.trainer' >> "$OUT/install.log" 2>&1; then
    missing=$("$PYTHON" - <<'PYEOF' 2>/dev/null
import importlib.util
print(" ".join(m for m in ("numpy", "yaml", "tqdm") if importlib.util.find_spec(m) is None))
PYEOF
)
    record install failed "$(( $(date +%s) - began ))" "lunaris cannot be imported (missing: ${missing:-see install.log}); put wheels of the missing packages in $WHEELS" "$OUT/install.log"
    echo "gpu_check.sh: lunaris cannot be imported after the install (missing: ${missing:-see $OUT/install.log})." \
         "Without network, put wheels of its dependencies (pyyaml, numpy, tqdm, ...) in $WHEELS." >&2
    finish 5
fi
notes=$(printf '%s; ' "${install_notes[@]}")
record install ok "$(( $(date +%s) - began ))" "${notes%; }" "$OUT/install.log"

# ---- 3. the CUDA tests ------------------------------------------------------------------------------------
if [ "$SKIP_TESTS" = 1 ]; then
    record tests skipped 0 "--skip-tests"
elif ! "$PYTHON" -c 'import pytest' > /dev/null 2>&1; then
    record tests skipped 0 "pytest is not installed: put its wheels (pytest, pluggy, iniconfig, packaging) in $WHEELS"
else
    limit=$(min "$TESTS_CAP" "$(( $(remaining) - 5 ))")
    if [ "$limit" -lt 30 ]; then
        record tests skipped 0 "no time left in the ${BUDGET} s budget"
    else
        run_stage tests "$limit" "$OUT/tests.log" \
            "$PYTHON" -m pytest tests/cuda -p no:cacheprovider -rs --junitxml="$OUT/tests.xml"
        summary=$("$PYTHON" - "$OUT/tests.xml" 2>/dev/null <<'PYEOF'
import sys
import xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
bad = {tag: sum(c.find(tag) is not None for c in cases) for tag in ("failure", "error", "skipped")}
print(f"{len(cases) - sum(bad.values())} passed, {bad['failure']} failed, {bad['error']} errors, "
      f"{bad['skipped']} skipped")
PYEOF
)
        status=$(status_of "$STAGE_RC")
        [ "$status" = timeout ] && summary="stopped after ${limit} s; ${summary}"
        record tests "$status" "$STAGE_SECONDS" "${summary:-exit $STAGE_RC}" "$OUT/tests.log"
        [ "$status" = ok ] || FAILED=1
    fi
fi

# ---- 4. lunaris bench --device cuda -----------------------------------------------------------------------
if [ "$SKIP_BENCH" = 1 ]; then
    record bench skipped 0 "--skip-bench"
elif ! "$PYTHON" -c 'import transformers' > /dev/null 2>&1; then
    record bench skipped 0 "transformers is not installed (lunaris bench times transformers' Llama as its baseline); put its wheels in $WHEELS"
else
    for run in "${BENCH_RUNS[@]}"; do
        name="${run%%|*}"
        read -r -a options <<< "${run#*|}"
        left=$(( $(remaining) - 5 ))
        if [ "$left" -lt "$BENCH_MIN" ]; then
            record "bench $name" skipped 0 "no time left in the ${BUDGET} s budget (${left} s)"
            continue
        fi
        run_stage "bench $name" "$left" "$OUT/bench-$name.log" \
            "${LUNARIS[@]}" bench --device cuda "${options[@]}" --json "$OUT/bench-$name.json"
        status=$(status_of "$STAGE_RC")
        note="lunaris bench --device cuda ${options[*]}"
        [ "$status" = timeout ] && note="stopped after ${left} s (the budget): $note"
        record "bench $name" "$status" "$STAGE_SECONDS" "$note" "$OUT/bench-$name.log"
        [ "$status" = ok ] || FAILED=1
    done
fi

finish "$FAILED"
