#!/usr/bin/env bash
# Every GPU measurement of the project in one run (< 8 minutes on one GPU), as ONE JSON file.
#
#   bench/gpu_check.sh [--out gpu_check.json]          # on a machine with a CUDA GPU
#   bench/gpu_check.sh --quick [--out FILE]            # CPU smoke test of the same sections (CI)
#
# Sections (each the existing bench script; its JSON goes under "sections.<name>.result"):
#   sae_step   paper-size SAE step (B 2048, d 768, 8192 latents, k 64, BatchTopK): dense vs sparse,
#              which impl="auto" picks ("path"), MonoLoss overhead (auto_mono / auto)
#   monoscore  exact MonoScore over N = 65,536 (paper: 1.2 s on an H100)
#   packed     packed throughput at the paper size, P = 1, 4, 8, 16 (member steps/s, trials/hour)
#   sweep      a 4-trial demo sweep at resources.gpu 0.25 (4 trials share the GPU) + its audit
#   pytest     pytest -m gpu
# A section that fails or runs past its time limit is recorded with its exit code and the tail
# of its stderr; the others still run. Exit code: 0 if every section passed, else 1.
set -uo pipefail

out=gpu_check.json
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out) out="$2"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --quick, --out FILE)" >&2; exit 2 ;;
    esac
    shift
done
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RAY_TMPDIR=${RAY_TMPDIR:-$work/ray} RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
mkdir -p "$RAY_TMPDIR"

if [ "$quick" = 1 ]; then
    device=cpu
    sae_step=(bench/sae_step.py --quick --device cpu --sparse --reps 1 --warmup 1)
    monoscore=(bench/monoscore_full.py --quick --device cpu --repeats 1)
    packed=(bench/packed_step.py --quick --device cpu --packs 1 2 --reps 1 --warmup 0)
    sweep_set=(--dry-run --set resources.gpu=0)
    limits=(300 300 300 300 300)  # generous: a loaded CI box; idle it takes well under 90 s
else
    device=cuda
    sae_step=(bench/sae_step.py --device cuda --sparse)
    monoscore=(bench/monoscore_full.py --device cuda)
    packed=(bench/packed_step.py --device cuda --packs 1 4 8 16 --reps 5)
    sweep_set=(--num-samples 4 --set budget.max_concurrent=4 --set resources.gpu=0.25
               --set resources.cpu=1 --set fixed.epochs=2)
    limits=(60 60 90 180 90)
fi

# run NAME LIMIT_S CMD...: stdout to $work/NAME.out, stderr to $work/NAME.err, rc and wall time.
run() {
    local name=$1 limit=$2
    shift 2
    local t0
    t0=$(date +%s.%N)
    timeout "$limit" "$@" >"$work/$name.out" 2>"$work/$name.err"
    echo $? >"$work/$name.rc"
    echo "$t0 $(date +%s.%N)" >"$work/$name.time"
    echo "gpu_check: $name rc $(cat "$work/$name.rc")" >&2
}

# The sweep section: the sweep, then (not in a dry run, which records nothing) its audit.
sweep_cmd=("$PY" -m monoray sweep search_spaces/demo.yaml --root "$work/runs" --name gpu-check
           --quiet "${sweep_set[@]}")
[ "$quick" = 1 ] || sweep_cmd=(bash -c 'root=$1; shift; "$@" && "$0" -m monoray audit gpu-check --root "$root"'
                                 "$PY" "$work/runs" "${sweep_cmd[@]}")

mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" tests/*.py)

run sae_step "${limits[0]}" "$PY" "${sae_step[@]}"
run monoscore "${limits[1]}" "$PY" "${monoscore[@]}"
run packed "${limits[2]}" "$PY" "${packed[@]}"
run sweep "${limits[3]}" "${sweep_cmd[@]}"
run pytest "${limits[4]}" "$PY" -m pytest -q -p no:cacheprovider -m gpu "${gpu_tests[@]}"

"$PY" - "$work" "$out" "$quick" "$device" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "bench")
from _machine import machine

work, out, quick, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
sections = {}
for name in ("sae_step", "monoscore", "packed", "sweep", "pytest"):
    rc = int((work / f"{name}.rc").read_text())
    t0, t1 = map(float, (work / f"{name}.time").read_text().split())
    text = (work / f"{name}.out").read_text()
    entry = {"rc": rc, "wall_s": round(t1 - t0, 1), "timed_out": rc in (124, 137)}
    try:
        entry["result"] = json.loads(text)
    except ValueError:
        entry["stdout_tail"] = text.strip().splitlines()[-5:]
    if rc != 0:
        entry["stderr_tail"] = (work / f"{name}.err").read_text().strip().splitlines()[-5:]
    sections[name] = entry
ok = all(s["rc"] == 0 for s in sections.values())
report = {"bench": "gpu_check", "quick": quick, "device": device, "machine": machine(),
          "ok": ok, "wall_s": round(sum(s["wall_s"] for s in sections.values()), 1),
          "sections": sections}
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"gpu_check: wrote {out} ({'all sections passed' if ok else 'some sections FAILED'}, "
      f"{report['wall_s']} s)", file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
