#!/usr/bin/env bash
# Builds the CUDA (+cuDNN) dreambridge binary on a machine with no GPU and no CUDA install.
#
#   scripts/build-cuda.sh [--no-cudnn] [--nccl] [--compute-cap 90]
#
# 1. Fetches the CUDA 13.0.x toolchain and runtime wheels from PyPI (nvcc pinned to 13.0: PTX from
#    nvcc 13.1+ does not load on R580 drivers, which report CUDA 13.0).
# 2. Unpacks them into a CUDA_HOME-shaped tree, restores exec bits, adds the unversioned .so links
#    the linker needs, and generates a link stub for the driver library (libcuda.so, soname
#    libcuda.so.1; the real one comes from the GPU machine's driver).
#    With --nccl also NCCL 2.30 (the API version candle's cudarc bindings are generated for), for
#    data-parallel training over several GPUs.
# 3. Builds `--features cuda[,cudnn][,nccl]` with CUDA_COMPUTE_CAP (90 = H100/H200), in target/cuda.
# 4. Strips the binary and packs it with its launcher into dist/dreambridge-cuda-sm<cap>.tar.xz.
#
# Everything lands under target/ and dist/ (both ignored). A plain `cargo build` needs none of this.
# Clean build: ~15-20 min on 2 cores (candle-kernels' nvcc work dominates); ~2 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDNN=1
NCCL=0
CAP=${CUDA_COMPUTE_CAP:-90}
while [ $# -gt 0 ]; do
    case "$1" in
        --no-cudnn) CUDNN=0 ;;
        --nccl) NCCL=1 ;;
        --compute-cap) CAP=$2; shift ;;
        *) echo "usage: $0 [--no-cudnn] [--nccl] [--compute-cap N]" >&2; exit 2 ;;
    esac
    shift
done

TOOLKIT=${DREAMBRIDGE_CUDA_ROOT:-$PWD/target/cuda-toolkit}
ROOT=$TOOLKIT/13.0
WHEELS=(
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
)
[ "$CUDNN" = 1 ] && WHEELS+=(nvidia-cudnn-cu13==9.21.1.3)
[ "$NCCL" = 1 ] && WHEELS+=(nvidia-nccl-cu13==2.30.7)
STAMP=$ROOT/.provisioned-$(printf '%s\n' "${WHEELS[@]}" | sha1sum | cut -c1-12)

step() { echo "== $*"; }

provision() {
    step "fetching ${#WHEELS[@]} CUDA 13.0 wheels from PyPI"
    mkdir -p "$TOOLKIT/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --dest "$TOOLKIT/wheels" "${WHEELS[@]}"
    step "unpacking into $ROOT"
    rm -rf "$ROOT" "$TOOLKIT/unpack"
    mkdir -p "$ROOT/lib" "$TOOLKIT/unpack"
    for spec in "${WHEELS[@]}"; do
        name=${spec%%==*}; version=${spec##*==}
        wheel=$(ls "$TOOLKIT/wheels/${name//-/_}-$version-"*.whl)
        python3 -m zipfile -e "$wheel" "$TOOLKIT/unpack"
    done
    # CUDA 13 wheels share nvidia/cu13/{bin,include,lib,nvvm}; cuDNN and NCCL ship
    # nvidia/{cudnn,nccl}/{include,lib}.
    cp -a "$TOOLKIT/unpack/nvidia/cu13/." "$ROOT/"
    for extra in cudnn nccl; do
        if [ -d "$TOOLKIT/unpack/nvidia/$extra" ]; then
            cp -a "$TOOLKIT/unpack/nvidia/$extra/lib/." "$ROOT/lib/"
            cp -a "$TOOLKIT/unpack/nvidia/$extra/include/." "$ROOT/include/"
        fi
    done
    rm -rf "$TOOLKIT/unpack"
    chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* # zip extraction drops the exec bit
    for lib in libcudart libnvrtc libcurand libcublas libcublasLt libcudnn libnccl; do
        versioned=$(cd "$ROOT/lib" && ls "$lib".so.[0-9]* 2>/dev/null | sort | head -n1 || true)
        [ -n "$versioned" ] && ln -sf "$versioned" "$ROOT/lib/$lib.so"
    done
    step "generating the libcuda.so link stub"
    cargo fetch -q
    local sys
    sys=$(cargo metadata --format-version 1 --filter-platform x86_64-unknown-linux-gnu --features cuda |
        python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc"))')
    sys=$(dirname "$sys")/src/driver/sys
    mkdir -p "$ROOT/lib/stubs"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$sys"/*.rs | sort -u | sed 's/.*/void &(void) {}/' > "$TOOLKIT/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$TOOLKIT/libcuda_stub.c"
    echo "   $(wc -l < "$TOOLKIT/libcuda_stub.c") driver entry points"
    "$ROOT/bin/nvcc" --version | grep -q 'release 13.0' || { echo "nvcc is not 13.0" >&2; exit 1; }
    touch "$STAMP"
}

if ! pkg-config --exists hdf5 2>/dev/null; then # the .h5 reader links the system libhdf5
    step "installing libhdf5-dev"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libhdf5-dev pkg-config >/dev/null
fi
[ -f "$STAMP" ] || provision

FEATURES=cuda
[ "$CUDNN" = 1 ] && FEATURES=cuda,cudnn
[ "$NCCL" = 1 ] && FEATURES=$FEATURES,nccl
step "cargo build --release --features $FEATURES (CUDA_COMPUTE_CAP=$CAP)"
export CUDA_HOME=$ROOT CUDA_PATH=$ROOT CUDA_COMPUTE_CAP=$CAP PATH=$ROOT/bin:$PATH
export LIBRARY_PATH=$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
start=$(date +%s)
cargo build --release --features "$FEATURES" --target-dir target/cuda
echo "   built in $(( $(date +%s) - start )) s"

step "packing"
DIST=dist/dreambridge-cuda-sm$CAP
rm -rf "$DIST" && mkdir -p "$DIST"
strip -o "$DIST/dreambridge.bin" target/cuda/release/dreambridge
install -m 755 scripts/cuda-launcher.sh "$DIST/dreambridge"
readelf -d "$DIST/dreambridge.bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' > "$DIST/NEEDED"
# The GPU machine has the CUDA runtime but not Debian's libhdf5 (and what it links: curl, TLS, ...):
# ship every library the binary resolves from this system, except glibc's own and the C++ runtime.
mkdir -p "$DIST/lib"
LD_LIBRARY_PATH=$ROOT/lib ldd "$DIST/dreambridge.bin" | awk '$3 ~ /^\// { print $1, $3 }' | while read -r name path; do
    case "$name" in
        libc.so.*|libm.so.*|libdl.so.*|librt.so.*|libpthread.so.*|libresolv.so.*|ld-linux*|libstdc++.so.*|libgcc_s.so.*) ;;
        *) case "$path" in "$ROOT"/*) ;; *) cp -L "$path" "$DIST/lib/$name" ;; esac ;;
    esac
done
tar -C dist -cJf "$DIST.tar.xz" "$(basename "$DIST")"
echo "   $DIST.tar.xz ($(du -h "$DIST.tar.xz" | cut -f1)); the binary needs: $(tr '\n' ' ' < "$DIST/NEEDED")"
echo "   bundled from this system: $(ls "$DIST/lib" | wc -l) libraries (libhdf5 and its dependencies)"
echo "   on the GPU machine: tar xJf $(basename "$DIST").tar.xz && $(basename "$DIST")/dreambridge --help"
