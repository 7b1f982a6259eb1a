#!/usr/bin/env bash
# Builds what the H200 device machine needs and cannot download: vLLM 0.26.0 and
# its wheels for Python 3.12, installed into one folder, trimmed, compressed and
# split into three pieces that each fit a device call (64 MiB), in the ignored folders
# .c1 .c2 .c3 of this checkout; and the generated stubs, which calls carry too.
#
#     bench/gpu/build_payload.sh        # about 3 minutes here
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/tmp/dprouter-gpu-payload}
PY=${PY:-$ROOT/.venv/bin/python}
cd "$ROOT"
make stubs >/dev/null

platforms=()
for p in manylinux_2_28 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_31 \
         manylinux_2_34 manylinux_2_35 manylinux2014 manylinux1 linux; do
  platforms+=(--platform "${p}_x86_64")
done
target=(--python-version 3.12 --implementation cp --only-binary=:all: "${platforms[@]}")
mkdir -p "$WORK/wheels"
"$PY" -m pip download -q --no-deps "${target[@]}" -d "$WORK/wheels" -r bench/gpu/requirements.txt
rm -rf "$WORK/site"
"$PY" -m pip install -q --no-index --no-deps --no-compile "${target[@]}" --target "$WORK/site" \
  "$WORK"/wheels/*.whl
# What a Hopper GPU never loads: FA2 (vLLM takes FA3 on compute capability 9),
# the Rust front end, Blackwell kernels, DeepGEMM for other Pythons.
rm -rf "$WORK/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$WORK/site/vllm/vllm-rs" \
  "$WORK/site/vllm/third_party/fmha_sm100" "$WORK"/site/deep_gemm/_C.cpython-31[0134]-*.so

rm -f "$WORK"/site.tar.xz*
tar -cf - -C "$WORK/site" . | xz -6 -T0 > "$WORK/site.tar.xz"
# Three pieces: each call carries one beside the checkout, under 64 MiB in all.
size=$(stat -c %s "$WORK/site.tar.xz")
if (( size > 3 * 60 * 2**20 )); then
  echo "the payload is $((size / 2**20)) MiB: more than three calls' worth" >&2
  exit 1
fi
(cd "$WORK" && split -n 3 -d -a 1 site.tar.xz site.tar.xz. && rm site.tar.xz \
  && sha256sum site.tar.xz.* > site.sha256)
rm -rf .c1 .c2 .c3
for i in 0 1 2; do
  mkdir -p ".c$((i + 1))" && cp "$WORK/site.tar.xz.$i" ".c$((i + 1))/"
done
cp "$WORK/site.sha256" .c3/

# `ip` for the partition test, which the image lacks: Debian 12's iproute2 and
# the libraries it links, run there through the dynamic loader (device.sh).
ipr="$WORK/iproute2"
rm -rf "$ipr" && mkdir -p "$ipr/debs" .c3/ipr/bin .c3/ipr/lib
(cd "$ipr/debs" && apt-get download -q iproute2 libbpf1 libmnl0 libxtables12 libelf1 libcap2 \
  libtirpc3 libbsd0 libdb5.3 libselinux1 libmd0 libpcre2-8-0 libzstd1 zlib1g libgssapi-krb5-2 \
  libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1 2>/dev/null)
for deb in "$ipr"/debs/*.deb; do dpkg -x "$deb" "$ipr/root"; done
cp "$ipr/root/bin/ip" .c3/ipr/bin/
cp -a "$ipr"/root/lib/x86_64-linux-gnu/*.so* "$ipr"/root/usr/lib/x86_64-linux-gnu/*.so* .c3/ipr/lib/
du -sh .c1 .c2 .c3 2>/dev/null
