#!/usr/bin/env bash
# Launcher shipped next to the CUDA build (dreambridge.bin). The binary links the CUDA 13 runtime
# libraries listed in NEEDED; the dynamic loader would refuse to start it with a bare "cannot open
# shared object file". This finds each one (LD_LIBRARY_PATH, CUDA_HOME, /usr/local/cuda*, the
# nvidia/cu13 wheels of a Python install, ldconfig), says clearly which are missing, then runs the
# binary with LD_LIBRARY_PATH set.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=$HERE/dreambridge.bin

candidates=()
IFS=: read -ra from_env <<< "${LD_LIBRARY_PATH:-}"
candidates+=("${from_env[@]}")
[ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME/lib64" "$CUDA_HOME/lib")
candidates+=(/usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib)
for py in python3 python; do
    command -v "$py" >/dev/null || continue
    while IFS= read -r d; do candidates+=("$d"); done < <("$py" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if p.endswith("-packages")])
for r in sorted(roots):
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")):
        print(d)
PY
)
    break
done

found_in() { # soname -> directory holding it, or nothing
    local dir
    for dir in "${candidates[@]}"; do
        [ -n "$dir" ] && [ -e "$dir/$1" ] && { echo "$dir"; return; }
    done
    if command -v ldconfig >/dev/null; then
        ldconfig -p 2>/dev/null | awk -v n="$1" '$1 == n { sub(/\/[^\/]*$/, "", $NF); print $NF; exit }'
    fi
}

# The CUDA libraries the binary links (NEEDED, written by scripts/build-cuda.sh), plus cuBLASLt,
# which libcublas loads.
needed=(libcublasLt.so.13)
while read -r lib; do
    case "$lib" in libcuda.so*|libcudart.so*|libcublas.so*|libcurand.so*|libcudnn.so*|libnccl.so*) needed+=("$lib") ;; esac
done < "$HERE/NEEDED"
missing=()
path=""
for lib in "${needed[@]}"; do
    dir=$(found_in "$lib")
    if [ -z "$dir" ]; then
        missing+=("$lib")
    elif [[ ":$path:" != *":$dir:"* ]]; then
        path=${path:+$path:}$dir
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    {
        echo "dreambridge (CUDA build): missing CUDA 13 runtime libraries: ${missing[*]}"
        echo "  searched: LD_LIBRARY_PATH, \$CUDA_HOME/lib64, /usr/local/cuda*/lib64, <site-packages>/nvidia/*/lib, ldconfig"
        echo "  libcuda.so.1 comes with the NVIDIA driver (R580+); the others with the CUDA 13 toolkit or the"
        echo "  nvidia-*-cu13 / torch cu13 wheels (libnccl.so.2: nvidia-nccl-cu13). Point LD_LIBRARY_PATH at their folder, e.g."
        echo "  LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64 $0 ..."
    } >&2
    exit 127
fi
# CUDA first, then the libraries shipped beside the binary (libhdf5 and its dependencies).
export LD_LIBRARY_PATH=$path:$HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
exec "$BIN" "$@"
