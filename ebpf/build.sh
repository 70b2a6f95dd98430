#!/usr/bin/env bash
# Rebuilds the committed BPF objects in ebpf/bpf/ from source:
#   tally.bpf.o     the Rust programs every node loads (ebpf/programs, binary `tally`; aya-ebpf,
#                   pinned nightly + bpf-linker 0.10.4)
#   bench.bpf.o     the benchmark's reference programs (ebpf/programs, binary `bench`), loaded
#                   only by ebpf/examples/bench_attach.rs
#   <name>.bpf.o    each C CO-RE program ebpf/c/<name>.bpf.c (clang-19, committed vmlinux.h)
# Installs the pinned nightly, rust-src, bpf-linker and the Debian packages (clang-19, libbpf-dev,
# llvm-19) when missing. Objects are stripped of DWARF (`.BTF` and `.BTF.ext` stay) and built with
# source paths remapped, so they are byte-reproducible on any checkout.
#
#   ebpf/build.sh           rebuild and replace the committed objects
#   ebpf/build.sh --check   rebuild into a temporary directory; exit 1 if any object differs
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/bpf"
check=false
if [[ "${1:-}" == "--check" ]]; then
  check=true
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi

toolchain="$(sed -n 's/^channel = "\(.*\)"$/\1/p' "$here/programs/rust-toolchain.toml")"
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  rustup toolchain install "$toolchain" --profile minimal --component rust-src
fi
rustup component add rust-src --toolchain "$toolchain" >/dev/null 2>&1
if ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.4'; then
  cargo install bpf-linker@0.10.4 --locked
fi
missing=()
for p in clang-19 llvm-19 libbpf-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  [[ $(id -u) -eq 0 ]] || { echo "ebpf/build.sh: install ${missing[*]}" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
objcopy=llvm-objcopy-19

# Rust programs. The flags are what aya-build passes; the remaps keep checkout and home paths
# out of .BTF.ext's line info.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
flags=(
  --cfg=bpf_target_arch=\"x86_64\"
  -Cdebuginfo=2
  -Clink-arg=--btf
  "--remap-path-prefix=$here=/tally/ebpf"
  "--remap-path-prefix=$cargo_home=/cargo"
  "--remap-path-prefix=$rustup_home=/rustup"
)
encoded="$(printf '%s\x1f' "${flags[@]}")"
(
  cd "$here/programs"
  CARGO_ENCODED_RUSTFLAGS="${encoded%$'\x1f'}" \
    cargo "+$toolchain" build --locked --release \
      --target bpfel-unknown-none -Z build-std=core --target-dir "$here/programs/target"
)
# One object per binary of ebpf/programs (its [[bin]] names).
for bin in tally bench; do
  "$objcopy" --strip-debug "$here/programs/target/bpfel-unknown-none/release/$bin" "$out/$bin.bpf.o"
done

# C CO-RE programs.
for src in "$here"/c/*.bpf.c; do
  [[ -e "$src" ]] || continue
  name="$(basename "$src" .c)"
  clang-19 -O2 -g -target bpf -D__TARGET_ARCH_x86 -I"$here/c" \
    -fdebug-prefix-map="$here=/tally/ebpf" -c "$src" -o "$out/$name.o.tmp"
  "$objcopy" --strip-debug "$out/$name.o.tmp" "$out/$name.o"
  rm -f "$out/$name.o.tmp"
done

if $check; then
  status=0
  for obj in "$out"/*.o; do
    committed="$here/bpf/$(basename "$obj")"
    if ! cmp -s "$obj" "$committed"; then
      echo "ebpf/build.sh --check: $(basename "$obj") differs from the committed object; run ebpf/build.sh and commit" >&2
      status=1
    fi
  done
  for committed in "$here"/bpf/*.o; do
    [[ -e "$out/$(basename "$committed")" ]] || { echo "ebpf/build.sh --check: $(basename "$committed") has no source" >&2; status=1; }
  done
  [[ $status -eq 0 ]] && echo "ebpf/build.sh --check: committed objects match their sources"
  exit $status
fi
ls -l "$out"/*.o
